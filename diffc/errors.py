"""Errors diffc raises. Each message names the problem and how to fix it."""


class DiffcError(Exception):
    """Base class of every error diffc raises on purpose."""


class CaptureError(DiffcError):
    """A model (or one of its ops) could not be captured into the IR."""


class LintError(DiffcError):
    """A graph, its signature or its block table is inconsistent."""


class PassError(DiffcError):
    """A pass failed, or its pre/postconditions do not hold."""


class TargetError(DiffcError):
    """An unknown target, or one that is not available on this machine."""


class InputError(DiffcError):
    """Runtime inputs that do not match what the model was compiled for."""


class ArtifactError(DiffcError):
    """A saved artifact is missing, tampered with, or from an incompatible version."""


class PeerNotApplicable(DiffcError):
    """A peer method in a benchmark does not cover this model, by the peer's own design (a transformer
    block cache on a UNet, a UNet cache on a transformer)."""
