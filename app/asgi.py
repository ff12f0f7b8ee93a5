"""What gunicorn's worker imports: ``app.asgi:app``."""

from app.api import create_app
from app.config import load
from app.logconf import configure_logging

config = load()
configure_logging(config.log_level)
app = create_app(config)
