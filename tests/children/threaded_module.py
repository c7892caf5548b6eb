"""A module that starts a thread when imported: a zygote that preloads it cannot clone safely."""
import threading
import time

threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
