"""The rational gate: the functional kernel (eager, compiled, CPU C++), `RationalGate`, and the Remez fits."""

from rsae.rational.gate import RationalGate
from rsae.rational.kernel import rational_gate, rational_reference
from rsae.rational.remez import GateFit, fit_gate, lookup_fit

__all__ = ["GateFit", "RationalGate", "fit_gate", "lookup_fit", "rational_gate", "rational_reference"]
