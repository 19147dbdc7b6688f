"""Chromium for the browser tests (Debian's package driven by Playwright), axe-core injected
into a page, and the keyboard helpers of the keyboard-only tests.

axe-core is the npm package pinned by the repository's package.json (``make test`` runs
``npm ci``): its script is added to the page by Playwright and run against WCAG 2.0/2.1 A and
AA. The page's CSP forbids inline scripts, so the contexts that run axe bypass it
(``bypass_csp=True``); the keyboard tests keep the CSP and fail on any violation of it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
AXE = Path(__file__).resolve().parents[2] / "node_modules" / "axe-core" / "axe.min.js"
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
# On a phone, fingers: WCAG 2.2's target size (24 × 24 CSS px, or spaced apart) as well.
PHONE_TAGS = [*AXE_TAGS, "wcag22aa"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
REFLOW = {"width": 320, "height": 256}  # WCAG 1.4.10: 1280 CSS px zoomed to 400 %
MAX_TABS = 60  # a flow that needs more Tab presses to reach its target is itself a finding


def missing_tools() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (apt-get install chromium; make test does)"
    if not AXE.exists():
        return f"{AXE} is missing: install Node.js and npm, then `make js` (make test runs npm ci)"
    return None


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """Debian's Chromium, headless, driven by Playwright's async API (the processor runs in
    the test's event loop: a blocking call would starve it)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def csp_checked_tab(browser: Any, **context_options: Any) -> AsyncIterator[Any]:
    """A tab in a fresh context, under the pages' own CSP (no bypass); fails, on closing, if
    anything broke the CSP (an inline script or style, a foreign resource)."""
    context = await browser.new_context(**context_options)
    page = await context.new_page()
    page.set_default_timeout(15_000)
    blocked: list[str] = []
    page.on("console", lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None)
    try:
        yield page
    finally:
        await context.close()
    assert not blocked, blocked


async def page_turns_true(page: Any, expression: str, seconds: float = 5.0) -> None:
    """Wait until ``expression`` is true in the page. Not Playwright's wait_for_function: once
    its first check fails it polls with a predicate it compiles by eval, which the pages' own
    CSP (enforced in these tabs) refuses, so it failed whenever the first check came too early."""
    for _ in range(int(seconds / 0.05)):
        if await page.evaluate(expression):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never true in the page: {expression}")


async def axe_violations(page: Any, tags: list[str] = AXE_TAGS) -> list[dict[str, Any]]:
    """axe-core's violations on the page as it is now (dialogs open, errors shown...)."""
    if not await page.evaluate("typeof window.axe !== 'undefined'"):
        await page.add_script_tag(path=str(AXE))
    result = await page.evaluate(
        "tags => axe.run(document, {runOnly: {type: 'tag', values: tags}, resultTypes: ['violations']})",
        tags)
    return result["violations"]


def findings(violations: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    """One (rule, impact, target, help, failure summary) per failing element."""
    rows = []
    for v in violations:
        for node in v["nodes"]:
            target = " ".join(str(t) for t in node["target"])
            summary = " ".join((node.get("failureSummary") or "").split())
            rows.append((v["id"], v.get("impact") or "", target, v["help"], summary))
    return rows


def report(rows: list[tuple[str, str, str, str, str]]) -> str:
    """The findings as lines a person can act on."""
    return "\n".join(f"  [{rule}] ({impact}) {target}\n      {help_}\n      {summary}"
                     for rule, impact, target, help_, summary in rows)


async def focus_outline(page: Any) -> dict[str, str]:
    """The computed focus indicator of the focused element (outline and box-shadow)."""
    return await page.evaluate("""() => {
        const el = document.activeElement;
        const s = getComputedStyle(el);
        return {tag: el.tagName, text: (el.innerText || el.value || el.id || '').trim().slice(0, 60),
                outlineStyle: s.outlineStyle, outlineWidth: s.outlineWidth, outlineColor: s.outlineColor,
                boxShadow: s.boxShadow};
    }""")


def visible_focus(style: dict[str, str]) -> bool:
    outlined = style["outlineStyle"] not in ("none", "") and float(style["outlineWidth"].rstrip("px") or 0) >= 2
    return outlined or style["boxShadow"] not in ("none", "")


async def tab_to(page: Any, selector: str, *, backwards: bool = False) -> dict[str, str]:
    """Press Tab (or Shift+Tab) until the element matching ``selector`` has the focus; checks
    that every element the focus passes shows a focus indicator. Returns the target's style."""
    key = "Shift+Tab" if backwards else "Tab"
    passed: list[str] = []
    for _ in range(MAX_TABS):
        await page.keyboard.press(key)
        style = await focus_outline(page)
        if style["tag"] != "BODY":
            assert visible_focus(style), f"no visible focus indicator on {style}"
        passed.append(f"{style['tag']}:{style['text']}")
        if await page.evaluate("s => document.activeElement.matches(s)", selector):
            return style
    raise AssertionError(f"{selector} not reached with {MAX_TABS} × {key}; focus went through {passed}")


# What axe 4.x no longer checks or leaves to judgement, checked here: ids unique and every id a
# label or description points at present (WCAG 2.1's 4.1.1 and 1.3.1), every data table named
# (a caption or aria-label/labelledby) with its column headers scoped.
DOM_CHECKS = """() => {
    const rows = [];
    const seen = new Map();
    document.querySelectorAll('[id]').forEach(el => seen.set(el.id, (seen.get(el.id) || 0) + 1));
    seen.forEach((n, id) => { if (n > 1) rows.push(['duplicate-id', '#' + id, n + ' elements share this id']); });
    const describe = el => el.id ? '#' + el.id : el.tagName.toLowerCase() + (el.name ? `[name=${el.name}]` : '');
    document.querySelectorAll('[for], [aria-describedby], [aria-labelledby], [aria-controls]').forEach(el => {
        for (const attr of ['for', 'aria-describedby', 'aria-labelledby', 'aria-controls']) {
            for (const id of (el.getAttribute(attr) || '').split(/\\s+/).filter(Boolean)) {
                if (!document.getElementById(id)) rows.push(['idref', describe(el), `${attr} names a missing #${id}`]);
            }
        }
    });
    document.querySelectorAll('table').forEach((table, i) => {
        const where = (table.className ? 'table.' + table.className.split(' ')[0] : 'table') + ` (table ${i + 1})`;
        const named = table.querySelector('caption') || table.getAttribute('aria-label')
            || table.getAttribute('aria-labelledby');
        if (!named) rows.push(['table-name', where, 'a data table needs a caption (or aria-label)']);
        table.querySelectorAll('thead th:not([scope])').forEach(
            () => rows.push(['th-scope', where, 'a column header needs scope="col"']));
    });
    return rows;
}"""


async def dom_problems(page: Any) -> list[tuple[str, str, str, str, str]]:
    """The DOM checks' findings, shaped like ``findings`` (rule, impact, target, help, detail)."""
    return [(rule, "serious", target, detail, "") for rule, target, detail in await page.evaluate(DOM_CHECKS)]
