"""A module that starts a background thread at import (like many libraries do)."""
import threading

_stop = threading.Event()
THREAD = threading.Thread(target=_stop.wait, name="import-time-poller", daemon=True)
THREAD.start()
