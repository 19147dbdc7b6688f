"""A Grafana stand-in for the compose test (see the Dockerfile beside this file).

Loads /etc/grafana/provisioning as Grafana does and exits non-zero when it is broken; serves
/api/health, /api/search, /api/dashboards/uid/UID and /api/datasources/proxy/uid/UID/PATH
(basic auth as GF_SECURITY_ADMIN_USER / GF_SECURITY_ADMIN_PASSWORD, except /api/health).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

PROVISIONING = Path(os.environ.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning"))
DATA = Path(os.environ.get("GF_PATHS_DATA", "/var/lib/grafana"))


def load() -> tuple[dict[str, dict], dict[str, dict]]:
    """(datasources by uid, dashboards by uid) from the provisioning files, or SystemExit."""
    datasources: dict[str, dict] = {}
    for path in sorted((PROVISIONING / "datasources").glob("*.y*ml")):
        for ds in yaml.safe_load(path.read_text()).get("datasources", []):
            if not ds.get("uid") or not ds.get("url"):
                sys.exit(f"{path}: datasource without uid or url: {ds}")
            datasources[ds["uid"]] = ds
    dashboards: dict[str, dict] = {}
    for path in sorted((PROVISIONING / "dashboards").glob("*.y*ml")):
        for provider in yaml.safe_load(path.read_text()).get("providers", []):
            if provider.get("type") != "file":
                sys.exit(f"{path}: provider {provider.get('name')} is not of type file")
            folder = Path(provider["options"]["path"])
            files = sorted(folder.glob("*.json"))
            if not files:
                sys.exit(f"{path}: no dashboard in {folder}")
            for file in files:
                dashboard = json.loads(file.read_text())
                dashboards[dashboard["uid"]] = {"dashboard": dashboard, "path": str(file),
                                                "folder": provider.get("folder", "")}
    if not datasources or not dashboards:
        sys.exit("no datasource or no dashboard provisioned")
    for entry in dashboards.values():
        for panel in entry["dashboard"].get("panels", []):
            for target in panel.get("targets", []):
                uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
                if uid is not None and uid not in datasources:
                    sys.exit(f"{entry['path']}: panel {panel.get('title')!r} uses unknown datasource {uid}")
    home = os.environ.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home and not any(entry["path"] == home for entry in dashboards.values()):
        sys.exit(f"GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH={home} is no provisioned dashboard")
    return datasources, dashboards


def main() -> None:
    datasources, dashboards = load()
    user = os.environ.get("GF_SECURITY_ADMIN_USER", "admin")
    password = os.environ.get("GF_SECURITY_ADMIN_PASSWORD") or sys.exit("GF_SECURITY_ADMIN_PASSWORD is empty")
    credentials = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    # State on the grafana volume, as grafana.db would be.
    (DATA / "standin.json").write_text(json.dumps({"dashboards": sorted(dashboards)}))

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, status: int, body: object, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/api/health":
                return self.reply(200, {"database": "ok", "version": "stand-in"})
            if self.headers.get("authorization") != credentials:
                return self.reply(401, {"message": "Unauthorized"})
            if self.path.startswith("/api/search"):
                return self.reply(200, [{"uid": uid, "title": e["dashboard"].get("title"),
                                         "folderTitle": e["folder"], "type": "dash-db"}
                                        for uid, e in dashboards.items()])
            if self.path.startswith("/api/dashboards/uid/"):
                entry = dashboards.get(self.path.rsplit("/", 1)[1])
                return self.reply(200, {"dashboard": entry["dashboard"]}) if entry else self.reply(404, {})
            prefix = "/api/datasources/proxy/uid/"
            if self.path.startswith(prefix):
                uid, _, rest = self.path[len(prefix):].partition("/")
                ds = datasources.get(uid)
                if ds is None:
                    return self.reply(404, {"message": "Data source not found"})
                try:
                    with urllib.request.urlopen(ds["url"].rstrip("/") + "/" + rest, timeout=10) as response:
                        return self.reply(response.status, response.read(),
                                          response.headers.get("content-type", "application/json"))
                except urllib.error.HTTPError as exc:
                    return self.reply(exc.code, exc.read())
                except OSError as exc:
                    return self.reply(502, {"message": f"datasource unreachable: {exc}"})
            return self.reply(404, {"message": "Not found"})

        def log_message(self, *args: object) -> None:
            pass

    # PID 1 in its container: SIGTERM (`docker-compose stop`) has no default action there.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 3000), Handler)
    print(f"grafana stand-in: {len(datasources)} datasource(s), {len(dashboards)} dashboard(s) on :3000",
          flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
