"""Task plug-ins: data, protocol and baselines of one restoration task per module."""
