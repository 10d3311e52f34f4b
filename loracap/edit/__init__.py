"""`loracap edit`: the browser caption editor.

    index.py    the SQLite index of the dataset under DIR/.loracap/
    bulk.py     bulk edits and the undo log
    app.py      EditConfig, the JSON API, the page, the server

Needs the `serve` extra (FastAPI, uvicorn)."""
