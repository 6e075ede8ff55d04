"""Where the joint-KDE posterior is conservative: interior vs the edges of the mass prior.

Synthetic calibration with a known answer: log M uniform in [13.7, 15.2] (the training prior),
d = log M + N(0, 0.1). The exact posterior is a normal truncated to the prior range. Prints
coverage and mean 68% width of the exact posterior and of JointKDEPosterior, overall and for
predictions in the interior (14.1 < d < 14.8).

Usage: python scripts/posterior_edge_check.py [--bandwidth 0.2] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import truncnorm

from clustermass.posterior import JointKDEPosterior

LO, HI, NOISE = 13.7, 15.2, 0.1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidth", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-cal", type=int, default=3000)
    ap.add_argument("--n-eval", type=int, default=5000)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    def draw(n):
        m = rng.uniform(LO, HI, n)
        return m + rng.normal(0, NOISE, n), m

    dc, mc = draw(args.n_cal)
    de, me = draw(args.n_eval)
    a, b = (LO - de) / NOISE, (HI - de) / NOISE
    exact_pit = truncnorm.cdf(me, a, b, loc=de, scale=NOISE)
    exact_w = (truncnorm.ppf(0.8413, a, b, loc=de, scale=NOISE) - truncnorm.ppf(0.1587, a, b, loc=de, scale=NOISE))
    post = JointKDEPosterior(bandwidth=args.bandwidth).fit(dc, mc)
    kde_pit = post.cdf(de, me)
    s = post.summarize(de)
    kde_w = (s["log_m_hi1"] - s["log_m_lo1"]).to_numpy()
    inner = (de > 14.1) & (de < 14.8)
    print(f"{'posterior':<10} {'region':<9} {'n':>5} {'cov68':>6} {'cov95':>6} {'width68':>8}")
    for name, pit, w in (("exact", exact_pit, exact_w), ("joint KDE", kde_pit, kde_w)):
        for region, sel in (("all", np.ones_like(inner)), ("interior", inner)):
            c68 = np.mean((pit[sel] > 0.1587) & (pit[sel] < 0.8413))
            c95 = np.mean((pit[sel] > 0.02275) & (pit[sel] < 0.97725))
            print(f"{name:<10} {region:<9} {sel.sum():>5} {c68:>6.3f} {c95:>6.3f} {np.mean(w[sel]):>8.4f}")


if __name__ == "__main__":
    main()
