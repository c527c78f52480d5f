"""One module per command; importing them registers them on ``cli.main.app``."""
from . import convert  # noqa: F401
from . import data  # noqa: F401
from . import chat  # noqa: F401
from . import serve  # noqa: F401
from . import evolve  # noqa: F401
from . import eval  # noqa: F401
from . import upload  # noqa: F401
from . import distill  # noqa: F401
