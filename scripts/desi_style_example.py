"""A worked DESI-style example: survey tables as DESI gives them, then `clustermass infer`.

Makes a small synthetic sky (the package's mock sky) and writes it the way a DESI DR1 user has
it: galaxies with ``mean_fiber_ra, mean_fiber_dec, z, flux_r`` (nanomaggies), a few per cent of
targets observed twice (repeat spectra 0.1" apart), the brightest central galaxies without
photometry (``flux_r`` NaN, as both Coma centrals in DESI DR1), and a cluster list whose centres
are in columns of its own (``ra_bcg, dec_bcg, z_cl``) with RA in hours in a FITS file. Then it
prints, and with ``--model`` runs, the `clustermass infer` command that reads all of that.

    python scripts/desi_style_example.py --out desi_example/
    python scripts/desi_style_example.py --out desi_example/ --model runs/quick/models/cnn3d
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np


def make_tables(out: Path, area_deg2: float = 100.0, seed: int = 3) -> tuple[Path, Path]:
    """Write ``desi_galaxies.fits`` and ``desi_clusters.fits`` into ``out``; return their paths."""
    from astropy.table import Table

    from clustermass.simulate.mocksky import simulate_sky

    rng = np.random.default_rng(seed)
    gal, cl, _ = simulate_sky(area_deg2=area_deg2, seed=seed, progress=False)
    flux = 10 ** ((22.5 - gal["mag_r"].to_numpy()) / 2.5)  # nanomaggies
    # photometry missing for the clusters' central galaxies (the brightest ones)
    centrals = gal["is_central"].to_numpy(bool) & np.isin(gal["halo_index"], cl["halo_index"])
    flux[centrals] = np.nan
    g = Table({"targetid": np.arange(len(gal)), "mean_fiber_ra": gal["ra"].to_numpy(),
               "mean_fiber_dec": gal["dec"].to_numpy(), "z": gal["z"].to_numpy(), "flux_r": flux})
    g["mean_fiber_ra"].unit = g["mean_fiber_dec"].unit = "deg"
    twins = rng.choice(len(g), size=len(g) // 25, replace=False)  # 4% observed twice
    rep = g[twins]
    rep["mean_fiber_ra"] = rep["mean_fiber_ra"] + 0.1 / 3600.0
    rep["z"] = rep["z"] + rng.normal(0, 3e-5, len(rep))
    from astropy.table import vstack

    g = vstack([g, rep])
    c = Table({"cluster": cl["id"].to_numpy(), "ra_bcg": cl["ra"].to_numpy() / 15.0,
               "dec_bcg": cl["dec"].to_numpy(), "z_cl": cl["z"].to_numpy(),
               "log_m200c_true": cl["log_m200c_true"].to_numpy()})
    c["ra_bcg"].unit = "h"  # RA in hours: honoured from the FITS header
    c["dec_bcg"].unit = "deg"
    out.mkdir(parents=True, exist_ok=True)
    gal_path, cl_path = out / "desi_galaxies.fits", out / "desi_clusters.fits"
    g.write(gal_path, overwrite=True)
    c.write(cl_path, overwrite=True)
    return gal_path, cl_path


def infer_command(model: str, gal_path: Path, cl_path: Path, out: Path) -> list[str]:
    """The `clustermass infer` command for the DESI-style tables."""
    return ["clustermass", "infer", "--model", model, "--galaxies", str(gal_path), "--clusters", str(cl_path),
            "--galaxy-ra-col", "mean_fiber_ra", "--galaxy-dec-col", "mean_fiber_dec",
            "--cluster-ra-col", "ra_bcg", "--cluster-dec-col", "dec_bcg", "--cluster-z-col", "z_cl",
            "--id-col", "cluster", "--flux-col", "flux_r", "--flux-unit", "nanomaggies",
            "--out", str(out / "masses"), "--overwrite"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("desi_example"))
    ap.add_argument("--area", type=float, default=100.0, help="mock sky area [deg^2]")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--model", help="a calibrated bundle: also run `clustermass infer`")
    args = ap.parse_args()
    gal_path, cl_path = make_tables(args.out, args.area, args.seed)
    cmd = infer_command(args.model or "runs/quick/models/cnn3d", gal_path, cl_path, args.out)
    print(f"wrote {gal_path} and {cl_path}\n\n" + " ".join(shlex.quote(c) for c in cmd))
    if args.model:
        cmd[0] = str(Path(sys.executable).with_name("clustermass"))
        sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    main()
