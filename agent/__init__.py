"""litefleet on-device agent: verified installs, accelerated inference, telemetry.

Nothing under this package may import tensorflow: a device installs ``litefleet[device]``.
"""

__version__ = "0.1.0"
