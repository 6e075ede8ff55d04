"""Cosmological particle-mesh (PM) boxes with jaxpm (the ``nbody`` extra).

One box: Gaussian initial conditions drawn from the simulation cosmology's linear matter power
spectrum (colossus, Planck 2013: :data:`clustermass.cosmology.SIMULATION_COSMOLOGY`), particles
started with second-order Lagrangian perturbation theory (2LPT, jaxpm ``lpt(order=2)``) at
``a_start``, then moved to ``z_final`` with kick-drift-kick leapfrog steps uniform in the scale
factor (with FastPM's kick and drift factors, exact for linear growth) under PM forces (cloud-in-cell painting on a mesh of ``n_mesh``^3 cells, the
finite-difference gradient and inverse-Laplacian kernels of jaxpm / FastPM, Feng et al. 2016).

Units: positions comoving h^-1 Mpc in [0, box_size); velocities peculiar km/s; particle mass
h^-1 Msun. jaxpm works in mesh-cell units with the momentum p = a^2 dx/dt / H0, so the peculiar
velocity is v = 100 p * (box_size / n_mesh) / a km/s.

jaxpm and JAX are imported inside the functions: without the ``nbody`` extra this module imports,
and :func:`run_pm` raises :class:`NbodyExtraMissingError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import cosmology
from ..errors import ClustermassError, ConfigError

#: critical density today [h^2 Msun Mpc^-3] (colossus' value, times 1e9 for kpc^-3 -> Mpc^-3)
_RHO_CRIT0 = 2.77536627e11


class NbodyExtraMissingError(ClustermassError, ImportError):
    """jaxpm / JAX (or halotools) is not installed: ``pip install 'clustermass[nbody]'``."""


def _import_jaxpm():
    import warnings

    try:
        import jax
        import jax.numpy as jnp

        with warnings.catch_warnings():  # jax_cosmo 0.1.0 imports the deprecated pkg_resources
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            import jax_cosmo as jc
        from jaxpm import kernels, painting, pm
        from jaxpm.distributed import fft3d, ifft3d
    except ImportError as exc:
        raise NbodyExtraMissingError(
            f"the PM engine needs the nbody extra (jaxpm, JAX, halotools): "
            f"pip install 'clustermass[nbody]' ({exc})"
        ) from exc
    return jax, jnp, jc, pm, kernels, painting, fft3d, ifft3d


@dataclass
class PMBox:
    """The particles of one PM box at redshift ``redshift``.

    ``pos`` [h^-1 Mpc comoving, (n, 3) float32 in [0, box_size)], ``vel`` [km/s peculiar,
    (n, 3) float32], ``particle_mass`` [h^-1 Msun], ``box_size`` [h^-1 Mpc], ``meta`` (settings,
    wall times [s]).
    """

    pos: np.ndarray
    vel: np.ndarray
    particle_mass: float
    box_size: float
    redshift: float
    meta: dict = field(default_factory=dict)


def particle_mass(box_size: float, n_particles: int, cosmo: str = cosmology.SIMULATION_COSMOLOGY) -> float:
    """Mass of one particle [h^-1 Msun]: Omega_m rho_crit,0 L^3 / N^3."""
    om = cosmology.use(cosmo).Om0
    return float(om * _RHO_CRIT0 * box_size**3 / n_particles**3)


def jax_cosmology(cosmo: str = cosmology.SIMULATION_COSMOLOGY):
    """jax_cosmo Cosmology with colossus' parameters of ``cosmo`` (growth and background of the
    PM steps; flat, w = -1)."""
    jc = _import_jaxpm()[2]
    c = cosmology.use(cosmo)
    return jc.Cosmology(Omega_c=c.Om0 - c.Ob0, Omega_b=c.Ob0, h=c.h, n_s=c.ns, sigma8=c.sigma8,
                        Omega_k=0.0, w0=-1.0, wa=0.0)


def linear_power(k, z: float = 0.0, cosmo: str = cosmology.SIMULATION_COSMOLOGY):
    """Linear matter power spectrum P(k) [h^-3 Mpc^3] at wavenumbers k [h Mpc^-1] (colossus,
    Eisenstein & Hu 1998 transfer function, normalised to the cosmology's sigma8)."""
    k = np.asarray(k, dtype=float)
    return cosmology.use(cosmo).matterPowerSpectrum(k, z)


def _check(box_size, n_particles, n_mesh, n_steps, a_start, z_final):
    if box_size <= 0:
        raise ConfigError("pm.box_size must be positive [h^-1 Mpc]")
    if n_particles < 8 or n_mesh < n_particles:
        raise ConfigError("pm.n_particles must be >= 8 and pm.n_mesh >= pm.n_particles")
    if n_mesh % n_particles:
        raise ConfigError("pm.n_mesh must be a multiple of pm.n_particles")
    if n_steps < 1:
        raise ConfigError("pm.n_steps must be >= 1")
    if not 0 < a_start < 1 / (1 + z_final):
        raise ConfigError("pm.a_start must lie between 0 and the final scale factor")


def run_pm(
    box_size: float = 200.0,
    n_particles: int = 128,
    n_mesh: int = 256,
    n_steps: int = 40,
    seed: int = 0,
    a_start: float = 0.05,
    z_final: float = 0.0,
    cosmo: str = cosmology.SIMULATION_COSMOLOGY,
    progress: bool = True,
) -> PMBox:
    """Run one PM box and return its particles at ``z_final``.

    Parameters
    ----------
    box_size : float
        Side of the periodic box [h^-1 Mpc comoving].
    n_particles : int
        Particles per side (``n_particles**3`` in all).
    n_mesh : int
        PM mesh cells per side, a multiple of ``n_particles`` (force resolution box_size/n_mesh).
    n_steps : int
        Kick-drift-kick steps, uniform in the scale factor from ``a_start`` to 1/(1+z_final).
    seed : int
        Seed of the initial Gaussian field (independent boxes: different seeds).
    a_start : float
        Scale factor of the 2LPT initial conditions.
    z_final : float
        Redshift of the output snapshot.

    Returns
    -------
    PMBox
    """
    _check(box_size, n_particles, n_mesh, n_steps, a_start, z_final)
    jax, jnp, jc, pm, kernels, painting, fft3d, ifft3d = _import_jaxpm()
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    jcosmo = jax_cosmology(cosmo)
    mesh = (n_mesh,) * 3
    ratio = n_mesh // n_particles
    # linear P(k) at z = 0 from colossus; no power above the particle grid's Nyquist frequency
    k_tab = np.logspace(-4, np.log10(np.sqrt(3) * np.pi * n_mesh / box_size) + 0.1, 512)
    pk_tab = linear_power(k_tab, 0.0, cosmo)
    pk_tab[k_tab > np.pi * n_particles / box_size] = 0.0
    k_j, pk_j = jnp.asarray(k_tab), jnp.asarray(pk_tab)

    def pk_fn(k):
        return jnp.interp(k.reshape(-1), k_j, pk_j).reshape(k.shape)

    ic = pm.linear_field(mesh, (box_size,) * 3, pk_fn, seed=jax.random.PRNGKey(int(seed)))
    grid = np.arange(n_particles, dtype=np.float32) * ratio
    q = jnp.asarray(np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), axis=-1).reshape(-1, 3))
    # painted counts per cell have mean 1 / ratio^3: weight ratio^3 gives 1 + delta
    weight = float(ratio**3)

    def forces(pos):
        """PM acceleration 1.5 Omega_m grad(laplace^-1 delta) at the particles [mesh units]."""
        rho = painting._cic_paint_impl(jnp.zeros(mesh), pos, weight)
        delta_k = fft3d(rho)
        kvec = kernels.fftk(delta_k)
        pot_k = delta_k * kernels.invlaplace_kernel(kvec)
        return 1.5 * jcosmo.Omega_m * jnp.stack(
            [painting._cic_read_impl(ifft3d(-kernels.gradient_kernel(kvec, i) * pot_k), pos)
             for i in range(3)], axis=-1)

    # growth factors are evaluated eagerly (jax_cosmo caches its growth table in the cosmology
    # object, which must not happen inside a jit trace)
    def e(a):
        return float(np.sqrt(jc.background.Esqr(jcosmo, jnp.atleast_1d(a)))[0])

    def dgrowth(a):
        return float(pm.growth_factor(jcosmo, jnp.atleast_1d(a))[0])

    def g_p(a):  # p = g_p psi in linear theory: a^3 E dD/da
        return a**2 * float(pm.growth_rate(jcosmo, jnp.atleast_1d(a))[0]) * e(a) * dgrowth(a)

    def g_f(a):  # force = g_f psi in linear theory: a^2 E d(g_p)/da
        return a**2 * e(a) * float(pm.dGfa(jcosmo, jnp.atleast_1d(a))[0])

    def factors(a0, a1):
        """FastPM kick and drift factors (Feng et al. 2016), exact for the linear growing mode
        whatever the step size."""
        ah = 0.5 * (a0 + a1)
        return ((g_p(ah) - g_p(a0)) / g_f(a0), (dgrowth(a1) - dgrowth(a0)) / g_p(ah),
                (g_p(a1) - g_p(ah)) / g_f(a1))

    a_s = jnp.atleast_1d(a_start)
    g1 = dgrowth(a_start)
    g2 = 3 / 7 * float(pm.growth_factor_second(jcosmo, a_s)[0])  # jaxpm: -D2 = 3/7 * growth_factor_second
    lpt_c = (g1, g2, a_start**2 * e(a_start) * float(pm.growth_rate(jcosmo, a_s)[0]) * g1,
             a_start**2 * e(a_start) * float(pm.growth_rate_second(jcosmo, a_s)[0]) * g2)

    @jax.jit
    def start(ic):
        delta_k = fft3d(ic)
        kvec = kernels.fftk(delta_k)
        pot_k = delta_k * kernels.invlaplace_kernel(kvec)
        f1 = jnp.stack([painting._cic_read_impl(ifft3d(-kernels.gradient_kernel(kvec, i) * pot_k), q)
                        for i in range(3)], axis=-1)
        # second-order source: sum_{i<j} (phi_ii phi_jj - phi_ij^2)
        delta2 = 0.0
        acc = 0.0
        for i in range(3):
            sii = ifft3d(kernels.gradient_kernel(kvec, i) ** 2 * pot_k)
            delta2 += sii * acc
            acc += sii
            for j in range(i + 1, 3):
                delta2 -= ifft3d(kernels.gradient_kernel(kvec, i) * kernels.gradient_kernel(kvec, j) * pot_k) ** 2
        d2k = fft3d(delta2)
        p2k = d2k * kernels.invlaplace_kernel(kvec)
        f2 = jnp.stack([painting._cic_read_impl(ifft3d(-kernels.gradient_kernel(kvec, i) * p2k), q)
                        for i in range(3)], axis=-1)
        dx = lpt_c[0] * f1 + lpt_c[1] * f2
        p = lpt_c[2] * f1 + lpt_c[3] * f2
        return q + dx, p

    @jax.jit
    def kdk(pos, p, f, k1, dr, k2):
        """One kick-drift-kick step with precomputed kick (k1, k2) and drift (dr) factors; the
        force at the end of the step is returned for the next step's opening kick."""
        p = p + f * k1
        pos = jnp.mod(pos + p * dr, n_mesh)
        f = forces(pos)
        p = p + f * k2
        return pos, p, f

    pos, p = start(ic)
    f = jax.jit(forces)(pos)
    t_ic = time.perf_counter() - t0
    a_end = 1.0 / (1.0 + z_final)
    steps = np.linspace(a_start, a_end, n_steps + 1)
    for a0, a1 in tqdm(list(zip(steps[:-1], steps[1:], strict=True)), desc="PM steps",
                       disable=not progress, leave=False):
        pos, p, f = kdk(pos, p, f, *factors(float(a0), float(a1)))
    cell = box_size / n_mesh
    pos_out = np.mod(np.asarray(pos, dtype=np.float64) * cell, box_size).astype(np.float32)
    vel_out = (np.asarray(p, dtype=np.float64) * 100.0 * cell / a_end).astype(np.float32)
    meta = {
        "engine": "jaxpm",
        "box_size": float(box_size),
        "n_particles": int(n_particles),
        "n_mesh": int(n_mesh),
        "n_steps": int(n_steps),
        "a_start": float(a_start),
        "z_final": float(z_final),
        "seed": int(seed),
        "cosmology": cosmo,
        "ic_s": t_ic,
        "pm_s": time.perf_counter() - t0,
    }
    return PMBox(pos_out, vel_out, particle_mass(box_size, n_particles, cosmo), float(box_size),
                 float(z_final), meta)


def power_spectrum(pos, box_size: float, n_mesh: int, k_max: float | None = None, n_bins: int = 30,
                   shot_noise: bool = True):
    """Matter power spectrum of particles [h^-3 Mpc^3] in linear k bins [h Mpc^-1].

    CIC painting on ``n_mesh``^3 cells, the CIC window deconvolved, Poisson shot noise (V / N)
    subtracted (``shot_noise=False``: not, for lattice-like initial positions).

    Returns
    -------
    k (bin mean), P(k), number of modes per bin
    """
    pos = np.asarray(pos, dtype=np.float64) / box_size * n_mesh
    rho = np.zeros((n_mesh,) * 3)
    i0 = np.floor(pos).astype(np.int64)
    f = pos - i0
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1 - f[:, 0]
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1 - f[:, 1]
            for dz in (0, 1):
                wz = f[:, 2] if dz else 1 - f[:, 2]
                np.add.at(rho, ((i0[:, 0] + dx) % n_mesh, (i0[:, 1] + dy) % n_mesh,
                                (i0[:, 2] + dz) % n_mesh), wx * wy * wz)
    delta = rho / rho.mean() - 1.0
    dk = np.fft.rfftn(delta)
    kf = 2 * np.pi / box_size
    kx = np.fft.fftfreq(n_mesh, 1.0 / n_mesh) * kf
    kz = np.fft.rfftfreq(n_mesh, 1.0 / n_mesh) * kf
    KX, KY, KZ = np.meshgrid(kx, kx, kz, indexing="ij")
    kk = np.sqrt(KX**2 + KY**2 + KZ**2)
    kn = np.pi * n_mesh / box_size
    w = (np.sinc(KX / (2 * kn)) * np.sinc(KY / (2 * kn)) * np.sinc(KZ / (2 * kn))) ** 2
    pk = np.abs(dk / w) ** 2 * box_size**3 / n_mesh**6 - (box_size**3 / len(pos) if shot_noise else 0.0)
    # rfft: modes with 0 < kz < Nyquist stand for two modes
    mult = np.where((KZ > 0) & (KZ < kz[-1]), 2.0, 1.0)
    k_max = k_max or kn
    edges = np.linspace(kf / 2, k_max, n_bins + 1)
    idx = np.digitize(kk.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < n_bins)
    nm = np.bincount(idx[ok], weights=mult.ravel()[ok], minlength=n_bins)
    ks = np.bincount(idx[ok], weights=(mult * kk).ravel()[ok], minlength=n_bins)
    ps = np.bincount(idx[ok], weights=(mult * pk).ravel()[ok], minlength=n_bins)
    good = nm > 0
    return ks[good] / nm[good], ps[good] / nm[good], nm[good]


def halofit_power(k, z: float = 0.0, cosmo: str = cosmology.SIMULATION_COSMOLOGY):
    """Nonlinear matter power spectrum [h^-3 Mpc^3] at k [h Mpc^-1]: halofit (Takahashi et al.
    2012) of jax_cosmo with the Eisenstein & Hu transfer function (colossus is linear only)."""
    jax, jnp, jc, *_ = _import_jaxpm()
    jcosmo = jax_cosmology(cosmo)
    a = 1.0 / (1.0 + z)
    return np.asarray(jc.power.nonlinear_matter_power(jcosmo, jnp.asarray(k, dtype=float), a=a))
