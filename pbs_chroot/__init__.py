"""pbs_chroot: run batch jobs inside allowlisted OS images on Torque/PBS nodes.

Importing the package imports nothing else: the hooks pay only for what they use.
"""
__version__ = "0.1.0"
