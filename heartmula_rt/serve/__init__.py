"""`heartmula-rt serve`: the HTTP API (app.py) over the song service (service.py), its job
records (jobs.py), the process around them (server.py) and the web page (static/). Needs the
`serve` extra (FastAPI, uvicorn); nothing in the core imports it."""
