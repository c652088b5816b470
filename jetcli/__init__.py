"""jetcli: the Jet normalizing flow (Kolesnikov et al., arXiv 2412.15129) in compact PyTorch."""

__version__ = "0.1.0"

from jetcli.config import JetConfig, preset  # noqa: E402
from jetcli.model import Jet  # noqa: E402

__all__ = ["Jet", "JetConfig", "preset", "__version__"]
