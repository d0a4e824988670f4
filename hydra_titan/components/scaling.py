"""Power-law fits of loss against compute or size, and their extrapolation with an uncertainty band.

Why a module of its own: ``scripts/scaling_analysis.py`` turns runs into points, but whether
the fit is right (does it recover a known exponent, is the band honest when it extrapolates
three orders of magnitude) is pure numerics and deserves tests without a trainer in the loop.

Two forms (X is FLOPs or parameters, L the validation loss):

* ``saturating``: L = a·(X/x0)^(-b) + c, fitted by ``scipy.optimize.curve_fit`` (trust-region
  reflective, a > 0, 0 < b < 5, 0 <= c < min L). c is the irreducible loss.
* ``loglinear``: log L = log a - b·log(X/x0), i.e. L = a·(X/x0)^(-b) with c = 0, a straight line
  in log-log space, fitted by the same routine.

x0 is the geometric mean of the observed X: the fit works on X/x0 (order 1), which keeps the
covariance well conditioned; ``a`` is the loss scale at X = x0 (``a_at_x1`` gives it at X = 1).

``form="auto"`` tries the saturating form and falls back to the log-log line when c is not
identifiable from the data: fewer than 4 points (no residual degree of freedom for 3
parameters), the optimiser fails, the covariance is not finite, c ends on a bound (0, or the
lowest observed loss), or the standard error of c or b exceeds the value itself. Short runs on
small models are far from the floor, so they usually land on the line; the reason is kept in
``PowerLawFit.note``.

Points may carry standard errors (``sigma``, e.g. of a mean over seeds): they weight the fit
relative to one another (``absolute_sigma=False``).

Uncertainty: ``curve_fit``'s covariance (scaled by the residual variance, since the noise of a
final loss is not known a priori) is the asymptotic covariance of the estimates. A prediction's
band is a parametric bootstrap from it: parameter vectors drawn from N(theta, cov) with a fixed
seed, the prediction evaluated for each, and the central ``level`` percentile interval taken
(on a curve this nonlinear a percentile band is more honest far out than +-2 sigma). The
delta-method standard error (gradient' · cov · gradient) is reported alongside.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = ["FitError", "Interval", "PowerLawFit", "fit_power_law"]

Form = Literal["auto", "saturating", "loglinear"]
MAX_EXPONENT = 5.0  # b beyond this is not a power law of loss any more, it is a bad fit


class FitError(ValueError):
    """The points cannot be fitted (too few, non-positive, not finite); the message says which."""


@dataclass(frozen=True)
class Interval:
    """A prediction at one X: the point value, the bootstrap band and the delta-method std."""

    x: float
    value: float
    lower: float
    upper: float
    level: float
    delta_std: float

    def to_dict(self) -> dict[str, float]:
        return {"x": self.x, "value": self.value, "lower": self.lower, "upper": self.upper,
                "level": self.level, "delta_std": self.delta_std}


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted power law; ``theta`` is (a, b, c) for saturating, (log a, b) for loglinear."""

    form: Literal["saturating", "loglinear"]
    theta: tuple[float, ...]
    cov: tuple[tuple[float, ...], ...]
    x0: float
    n_points: int
    rms_residual: float  # of L, in loss units
    note: str = ""
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", ("a", "b", "c") if self.form == "saturating" else ("log_a", "b"))

    # ------------------------------------------------------------ parameters
    @property
    def a(self) -> float:
        return self.theta[0] if self.form == "saturating" else math.exp(self.theta[0])

    @property
    def b(self) -> float:
        return self.theta[1]

    @property
    def c(self) -> float:
        return self.theta[2] if self.form == "saturating" else 0.0

    @property
    def a_at_x1(self) -> float:
        """a in the unscaled law L = a'·X^(-b) + c, i.e. a·x0^b."""
        return self.a * self.x0 ** self.b

    def stderr(self) -> dict[str, float]:
        """Standard errors of a, b, c (sqrt of the covariance diagonal; a by the delta method on loglinear)."""
        var = np.diag(np.asarray(self.cov, dtype=float))
        std = dict(zip(self.names, np.sqrt(np.where(var >= 0, var, np.nan)).tolist()))
        if self.form == "loglinear":
            std["a"] = self.a * std.pop("log_a")
            std["c"] = 0.0
        return {k: std[k] for k in ("a", "b", "c")}

    # ------------------------------------------------------------ predictions
    def predict(self, x: np.ndarray | float, theta: np.ndarray | None = None) -> np.ndarray:
        """L at x (shaped like x); ``theta`` of shape [S, P] evaluates S parameter vectors ([S, *x.shape])."""
        xs = np.asarray(x, dtype=float)
        th = np.asarray(self.theta if theta is None else theta, dtype=float)
        th2 = np.atleast_2d(th)
        u = np.log(xs.ravel() / self.x0)[None, :]
        if self.form == "saturating":
            out = th2[:, :1] * np.exp(-th2[:, 1:2] * u) + th2[:, 2:3]
        else:
            out = np.exp(th2[:, :1] - th2[:, 1:2] * u)
        return out[0].reshape(xs.shape) if th.ndim == 1 else out.reshape((th2.shape[0], *xs.shape))

    def gradient(self, x: float) -> np.ndarray:
        """dL/dtheta at x, for the delta method."""
        u = math.log(x / self.x0)
        if self.form == "saturating":
            a, b, _ = self.theta
            p = math.exp(-b * u)
            return np.array([p, -a * u * p, 1.0])
        value = float(self.predict(x))
        return np.array([value, -u * value])

    def interval(self, x: float, *, level: float = 0.95, samples: int = 4000, seed: int = 0) -> Interval:
        """The prediction at x with its parametric-bootstrap band (see the module docstring)."""
        cov = np.asarray(self.cov, dtype=float)
        value = float(self.predict(x))
        grad = self.gradient(x)
        delta_std = float(math.sqrt(max(grad @ cov @ grad, 0.0)))
        rng = np.random.default_rng(seed)
        draws = rng.multivariate_normal(np.asarray(self.theta), cov, size=samples, method="eigh")
        preds = self.predict(float(x), draws)
        preds = preds[np.isfinite(preds)]
        tail = 100 * (1 - level) / 2
        lower, upper = np.percentile(preds, [tail, 100 - tail]) if preds.size else (math.nan, math.nan)
        return Interval(x=float(x), value=value, lower=float(lower), upper=float(upper), level=level,
                        delta_std=delta_std)

    def to_dict(self) -> dict:
        return {"form": self.form, "law": self.law(), "a": self.a, "b": self.b, "c": self.c, "x0": self.x0,
                "a_at_x1": self.a_at_x1, "stderr": self.stderr(), "theta_names": list(self.names),
                "theta": list(self.theta), "cov": [list(row) for row in self.cov], "n_points": self.n_points,
                "rms_residual": self.rms_residual, "note": self.note}

    def law(self) -> str:
        err = self.stderr()
        text = f"L = {self.a:.4g}·(X/{self.x0:.3g})^(-{self.b:.4f} ± {err['b']:.4f})"
        return text + (f" + {self.c:.4g} ± {err['c']:.2g}" if self.form == "saturating" else "")


# ---------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------


def fit_power_law(x, y, form: Form = "auto", sigma=None) -> PowerLawFit:
    """Fit L = a·(X/x0)^(-b) [+ c] to points (x, y); raises FitError on unusable input.

    ``sigma``: per-point standard errors of L (e.g. over seeds), used as relative weights
    (``curve_fit(sigma=..., absolute_sigma=False)``: the covariance is still scaled by the
    residuals); in log space (the log-log line) they become sigma / L.
    """
    xs, ys, sig = _check_points(x, y, sigma, min_points=4 if form == "saturating" else 3)
    x0 = float(np.exp(np.mean(np.log(xs))))
    if form == "loglinear":
        return _fit_loglinear(xs, ys, sig, x0, note="log-log line requested")
    try:
        fit = _fit_saturating(xs, ys, sig, x0)
    except FitError as err:
        if form == "saturating":
            raise
        return _fit_loglinear(xs, ys, sig, x0, note=f"c not identifiable ({err}); fitted the log-log line (c = 0)")
    if form == "auto":
        reason = _unidentifiable(fit, ys)
        if reason:
            return _fit_loglinear(xs, ys, sig, x0,
                                  note=f"c not identifiable ({reason}); fitted the log-log line (c = 0)")
    return fit


def _check_points(x, y, sigma, min_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    xs, ys = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    sig = None if sigma is None else np.asarray(sigma, dtype=float).ravel()
    if xs.shape != ys.shape or (sig is not None and sig.shape != ys.shape):
        raise FitError(f"x, y (and sigma) differ in length ({xs.size} vs {ys.size})")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise FitError("points must be finite")
    if sig is not None and not np.all(np.isfinite(sig) & (sig > 0)):
        raise FitError("sigma must be finite and positive")
    if np.any(xs <= 0) or np.any(ys <= 0):
        raise FitError("a power law needs positive x and loss")
    if xs.size < min_points:
        raise FitError(f"need at least {min_points} points, got {xs.size}")
    if np.unique(xs).size < 2:
        raise FitError("all points have the same x: no slope to fit")
    order = np.argsort(xs)
    return xs[order], ys[order], None if sig is None else sig[order]


def _curve_fit(f, u, ys, p0, bounds, sigma):
    from scipy.optimize import OptimizeWarning, curve_fit

    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizeWarning)
        try:
            popt, pcov = curve_fit(f, u, ys, p0=p0, sigma=sigma, bounds=bounds, maxfev=20000)
        except (RuntimeError, OptimizeWarning, ValueError) as err:
            raise FitError(f"curve_fit failed: {err}") from None
    return popt, pcov


def _fit_saturating(xs: np.ndarray, ys: np.ndarray, sig: np.ndarray | None, x0: float) -> PowerLawFit:
    u = np.log(xs / x0)
    p0 = _initial_guess(u, ys)
    upper_c = float(ys.min()) * (1 - 1e-9)
    popt, pcov = _curve_fit(lambda t, a, b, c: a * np.exp(-b * t) + c, u, ys, p0,
                            ([1e-12, 1e-9, 0.0], [np.inf, MAX_EXPONENT, upper_c]), sig)
    return _make_fit("saturating", xs, ys, x0, popt, pcov)


def _initial_guess(u: np.ndarray, ys: np.ndarray) -> list[float]:
    """(a, b, c) from the best log-log line of L - c over a grid of c below the lowest loss."""
    best = None
    for c in np.linspace(0.0, 0.98 * ys.min(), 50):
        slope, intercept = np.polyfit(u, np.log(ys - c), 1)
        sse = float(np.sum((np.exp(intercept + slope * u) + c - ys) ** 2))
        if best is None or sse < best[0]:
            best = (sse, math.exp(intercept), min(max(-slope, 1e-3), MAX_EXPONENT * 0.99), c)
    _, a, b, c = best
    return [a, b, c]


def _fit_loglinear(xs: np.ndarray, ys: np.ndarray, sig: np.ndarray | None, x0: float, note: str) -> PowerLawFit:
    u = np.log(xs / x0)
    slope, intercept = np.polyfit(u, np.log(ys), 1)
    popt, pcov = _curve_fit(lambda t, log_a, b: log_a - b * t, u, np.log(ys), [intercept, -slope],
                            (-np.inf, np.inf), None if sig is None else sig / ys)
    if not np.all(np.isfinite(pcov)):
        raise FitError("the covariance of the log-log line is not finite (points on an exact line need >= 3)")
    return _make_fit("loglinear", xs, ys, x0, popt, pcov, note=note)


def _make_fit(form, xs, ys, x0, popt, pcov, note: str = "") -> PowerLawFit:
    fit = PowerLawFit(form=form, theta=tuple(float(v) for v in popt),
                      cov=tuple(tuple(float(v) for v in row) for row in np.asarray(pcov)), x0=x0,
                      n_points=int(xs.size), rms_residual=0.0, note=note)
    return dataclasses.replace(fit, rms_residual=float(np.sqrt(np.mean((fit.predict(xs) - ys) ** 2))))


def _unidentifiable(fit: PowerLawFit, ys: np.ndarray) -> str:
    """Why the saturating fit's c cannot be trusted, or '' when it can."""
    cov = np.asarray(fit.cov)
    if fit.n_points < 4:
        return f"{fit.n_points} points for 3 parameters"
    if not np.all(np.isfinite(cov)):
        return "covariance not finite"
    err = fit.stderr()
    if fit.c <= 1e-6 * ys.min():
        return "c fitted at its lower bound 0"
    if fit.c >= (1 - 1e-3) * ys.min():
        return "c fitted at the lowest observed loss"
    if err["c"] > fit.c:
        return f"std error of c ({err['c']:.3g}) exceeds c ({fit.c:.3g})"
    if err["b"] > fit.b:
        return f"std error of b ({err['b']:.3g}) exceeds b ({fit.b:.3g})"
    return ""
