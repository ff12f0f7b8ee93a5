"""ctr-farm: a CPU inference farm that ranks ad candidates by predicted CTR."""

from app.config import Config, load
from app.errors import FarmError

__all__ = ["Config", "FarmError", "load"]
