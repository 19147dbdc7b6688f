"""The gate on every request, in three layers that never mix:

* ``envoy``: Envoy's ext_proc protocol (messages in, mutations and immediate replies out);
* ``translators``: one per OpenAI API schema (what a body bills, how its answer reports usage);
* ``decisions``: the ``Gate`` (identity, rate limit, admission, settle, release) on plain values.

Pure rules below them: ``billable`` (the estimate), ``usage`` (reading and counting usage),
``accounting`` and the ledger for money.
"""
