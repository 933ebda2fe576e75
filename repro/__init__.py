"""repro: pinned suites for normalization methods and test-time adaptation on timm backbones."""

__version__ = "0.1.0"
