"""The console: the whole fleet's run history, followed from `<prefix>.status` into a SQLite
file of its own, behind an HTTP API and a page (`jobctl serve`).

- `follow.py`: `Follower` reads the status topic from the offsets stored in the file and
  folds it with the store's `fold_events`; `Hub` hands folded events to the event streams;
- `db.py`: `ConsoleDb`, the file (the worker's schema, plus the console's events, offsets
  and indexes); `queries.py`: `Queries`, the API's reads;
- `params.py`: strict query parameters; `api.py`: the aiohttp application;
  `openapi.py`: its OpenAPI document; `service.py`: `Console`, all of it as one process;
  `command.py`: `jobctl serve`; `static/`: the page.
"""
