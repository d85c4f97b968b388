"""The abdomen around the kidneys, built on a coarse grid in Hounsfield units.

Everything is placed relative to the real kidneys of the mask: the spine sits between them
(the kidneys are retroperitoneal, either side of the spine, posterior), the liver on the
patient's right above the right kidney, the spleen on the left above the left kidney, the
aorta and IVC in front of the spine, bowel in the anterior cavity. The kidneys themselves are
painted later, at full resolution (:mod:`.kidney`); here their place holds perirenal fat.

Coordinates are millimetres on the full grid, internal orientation: ``z`` grows inferiorly,
``y`` posteriorly, ``x`` towards the patient's left. Within this module ``X`` and ``Y`` are
measured from the centre of the vertebral body.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._grid import smooth_field
from .kidney import sample_tumor_look
from .params import PhantomParams, Protocol


@dataclass(frozen=True)
class KidneyInfo:
    """One kidney (a connected component of kidney + tumor), in mm on the full grid."""

    centroid: tuple[float, float, float]
    low: tuple[float, float, float]
    high: tuple[float, float, float]
    side: int  # -1: patient right, +1: patient left


@dataclass(frozen=True)
class Frame:
    """Where the body sits: derived from the kidneys, with per-case randomness."""

    spine_x: float
    spine_y: float
    z_kidney_top: float
    z_kidney_bottom: float
    kidneys: tuple[KidneyInfo, ...]


def find_kidneys(mask: np.ndarray, coords: tuple[np.ndarray, np.ndarray, np.ndarray],
                 image_centre_x: float) -> list[KidneyInfo]:
    """The (at most two) largest kidney components of a coarse foreground mask."""
    components, count = ndimage.label(mask)
    if count == 0:
        return []
    sizes = ndimage.sum_labels(mask, components, index=np.arange(1, count + 1))
    order = np.argsort(sizes)[::-1][:2]
    kept = [int(i) + 1 for i in order if sizes[i] >= 0.1 * sizes[order[0]]]
    found = []
    for label, box in zip(range(1, count + 1), ndimage.find_objects(components)):
        if label not in kept:
            continue
        idx = np.nonzero(components[box] == label)
        centre = tuple(float(c[box[a]][idx[a]].mean()) for a, c in enumerate(coords))
        low = tuple(float(c[box[a]][0]) for a, c in enumerate(coords))
        high = tuple(float(c[box[a]][-1]) for a, c in enumerate(coords))
        found.append((centre, low, high))
    if len(found) == 2:
        found.sort(key=lambda k: k[0][2])  # by x: patient right first
        if abs(found[1][0][2] - found[0][0][2]) > 60.0:
            return [KidneyInfo(*found[0], side=-1), KidneyInfo(*found[1], side=+1)]
    # A single kidney (or two pieces on one side): its side is judged from the image centre.
    found.sort(key=lambda k: -(k[2][0] - k[1][0]) * (k[2][1] - k[1][1]) * (k[2][2] - k[1][2]))
    return [KidneyInfo(*k, side=-1 if k[0][2] < image_centre_x else +1) for k in found]


def make_frame(kidneys: list[KidneyInfo], extent: tuple[float, float, float],
               rng: np.random.Generator) -> Frame:
    """Place the spine between the kidneys (or beside a single one)."""
    ez, ey, ex = extent
    if len(kidneys) == 2 and kidneys[0].side != kidneys[1].side:
        spine_x = 0.5 * (kidneys[0].centroid[2] + kidneys[1].centroid[2]) + float(rng.normal(0, 3))
        spine_y = 0.5 * (kidneys[0].centroid[1] + kidneys[1].centroid[1]) + float(rng.uniform(-4, 12))
    elif kidneys:
        k = kidneys[0]
        spine_x = k.centroid[2] - k.side * float(rng.uniform(60, 80))
        spine_y = k.centroid[1] + float(rng.uniform(-4, 12))
    else:
        spine_x, spine_y = 0.5 * ex, 0.62 * ey
    if kidneys:
        z_top = min(k.low[0] for k in kidneys)
        z_bottom = max(k.high[0] for k in kidneys)
    else:
        z_top, z_bottom = 0.3 * ez, 0.7 * ez
    return Frame(spine_x, spine_y, z_top, z_bottom, tuple(kidneys))


def _superellipse(X, Y, ax, ay, p):
    return (np.abs(X / ax) ** p + np.abs(Y / ay) ** p) ** (1.0 / p)


def build_abdomen(
    kidney_mask: np.ndarray,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    spacing: tuple[float, float, float],
    frame: Frame,
    protocol: Protocol,
    params: PhantomParams,
    rng: np.random.Generator,
) -> np.ndarray:
    """HU of the abdomen on the coarse grid (Z, Y, X), float32; kidneys left as perirenal fat.

    Args:
        kidney_mask: coarse kidney + tumor foreground (any fine voxel set).
        coords: mm positions (full grid) of the coarse voxel centres along z, y and x.
        spacing: coarse voxel size in mm.
    """
    hu_of = protocol.hu
    shape = kidney_mask.shape
    zc, yc, xc = coords
    Z = zc.astype(np.float32)[:, None, None]
    Y = (yc - frame.spine_y).astype(np.float32)[None, :, None]
    X = (xc - frame.spine_x).astype(np.float32)[None, None, :]
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    z_top, z_bot = frame.z_kidney_top, frame.z_kidney_bottom
    z_mid = 0.5 * (z_top + z_bot)
    kidneys = frame.kidneys

    # ------------------------------------------------------------------ body outline and wall
    lateral_need = max([abs(k.centroid[2] - frame.spine_x) + 0.5 * (k.high[2] - k.low[2]) + 35.0 for k in kidneys],
                       default=0.0)
    posterior_need = max([k.high[1] - frame.spine_y + 18.0 for k in kidneys], default=0.0)
    ax = max(u(*params.body_half_width_mm), lateral_need)
    ay = u(*params.body_half_depth_mm)
    back = max(u(55.0, 90.0), posterior_need)  # vertebral-body centre to the skin of the back
    y0 = back - 0.92 * ay  # body centre (Y)
    x0 = u(-8.0, 8.0)
    power = u(2.0, 2.7)
    theta = np.arctan2(Y - y0, X - x0)  # (1, ny, nx)
    wobble = np.ones_like(theta)
    for k in (2, 3, 4, 5):
        wobble += u(0.0, 0.035) * np.cos(k * theta + u(0, 2 * np.pi))
    z_wave = 1.0 + 0.04 * np.sin(2 * np.pi * Z / u(250, 500) + u(0, 2 * np.pi))  # (nz, 1, 1)
    ay_half = np.where(Y - y0 < 0, ay, 1.12 * ay).astype(np.float32)
    rho = _superellipse(X - x0, Y - y0, ax * z_wave, ay_half * z_wave, power) / wobble
    radial = np.hypot(X - x0, Y - y0)
    depth = np.minimum(radial * (1.0 / np.maximum(rho, 1e-3) - 1.0), back - Y)  # mm under the skin
    body = depth > 0

    anterior = np.clip(-np.sin(theta), 0.0, 1.0)  # 1 at the front, 0 at the sides and back
    fat_base = u(*params.subcutaneous_fat_mm)
    fat_t = fat_base * (0.55 + 0.6 * anterior + 0.15 * np.cos(2 * theta + u(0, 6.3))) + 2.0
    muscle_t = (u(6.0, 13.0) * (0.5 + 0.7 * np.abs(np.cos(theta)) + 0.5 * anterior))
    wall_inner = fat_t + muscle_t
    cavity = depth > wall_inner

    hu = np.full(shape, hu_of["air"], dtype=np.float32)
    fat_texture = smooth_field(rng, shape, spacing, 6.0)
    visceral_fat = hu_of["fat"] + 8.0 + 6.0 * fat_texture
    hu[body] = visceral_fat[body]
    sub_fat = body & (depth < fat_t)
    hu[sub_fat] = (hu_of["fat"] - 5.0 + 5.0 * fat_texture)[sub_fat]
    wall = body & ~sub_fat & ~cavity
    muscle_tex = hu_of["muscle"] + 4.0 * smooth_field(rng, shape, spacing, 4.0)
    hu[wall] = muscle_tex[wall]
    hu[body & (depth < 2.0)] = hu_of["skin"]
    if protocol.table:  # the patient table under the back: a curved carbon-fibre plate
        top = back + u(3.0, 30.0) - 0.0012 * (X - x0) ** 2
        plate = (Y > top) & (Y < top + u(6.0, 14.0)) & (np.abs(X - x0) < 0.85 * ax) & ~body
        hu[np.broadcast_to(plate, shape)] = u(-450.0, -150.0)

    def ellipsoid(cz, cy, cx, rz, ry, rx):
        return ((Z - cz) / rz) ** 2 + ((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2

    def paint(mask, value):
        mask = np.broadcast_to(mask, shape)
        if isinstance(value, np.ndarray) and value.ndim:
            hu[mask] = np.broadcast_to(value, shape)[mask]
        else:
            hu[mask] = value

    inner_ax, inner_ay = ax - fat_base, ay - fat_base

    # ------------------------------------------------------------------ chest: lungs above the diaphragm
    z_dome = z_top - u(25.0, 75.0)
    dome = z_dome + 35.0 * ((X - x0) / ax) ** 2 + 15.0 * np.clip(Y / ay, 0, None)
    lung = cavity & (Z < dome) & (np.abs(X) > 25.0)
    paint(lung, hu_of["lung"] + 15.0 * fat_texture)
    heart = cavity & (ellipsoid(z_dome - 70.0, -0.45 * ay, 0.15 * ax, 70.0, 0.4 * ay, 0.35 * ax) < 1) & (Z < dome - 10.0)
    paint(heart, hu_of["blood"])

    # ------------------------------------------------------------------ liver and gallbladder (patient right)
    right_kidney = [k for k in kidneys if k.side < 0]
    z_rk = right_kidney[0].centroid[0] if right_kidney else z_mid
    z_liver_low = z_rk + u(-15.0, 40.0)
    liver_span = z_liver_low - (z_dome - 10.0)
    liver_cz = z_dome - 10.0 + 0.35 * liver_span
    liver = cavity & (Z > dome - 8.0) & (
        ellipsoid(liver_cz, -0.15 * ay + y0, -0.6 * inner_ax, 0.65 * liver_span, 0.8 * inner_ay, 0.62 * inner_ax) < 1
    )
    liver_tex = hu_of["liver"] + 4.0 * smooth_field(rng, shape, spacing, 8.0)
    # Hepatic vessels: thin tubes along the zero set of a smooth field.
    vessel_field = smooth_field(rng, shape, spacing, 14.0)
    liver_vessels = np.abs(vessel_field) < 0.07
    vessel_hu = hu_of["vein"] if protocol.phase in ("venous", "delayed") else hu_of["liver"] - 15.0
    liver_tex[liver_vessels] = vessel_hu
    paint(liver, liver_tex)
    if rng.random() < 0.6:
        gb = cavity & (ellipsoid(z_liver_low - u(10, 40), y0 - 0.35 * ay, -0.3 * inner_ax, u(20, 35), u(12, 18), u(12, 20)) < 1)
        paint(gb, hu_of["fluid"] + u(0, 12))

    # ------------------------------------------------------------------ spleen and stomach (patient left)
    left_kidney = [k for k in kidneys if k.side > 0]
    z_lk_top = left_kidney[0].low[0] if left_kidney else z_top
    spleen_low = z_lk_top + u(5.0, 55.0)
    spleen_rz = 0.5 * max(spleen_low - z_dome, 40.0)
    spleen = cavity & (Z > dome - 5.0) & (
        ellipsoid(spleen_low - spleen_rz, u(0.05, 0.3) * ay, 0.72 * inner_ax, spleen_rz, u(0.3, 0.42) * ay, u(0.2, 0.3) * inner_ax) < 1
    )
    spleen_amp = 25.0 if protocol.phase == "arterial" else 4.0  # arterial-phase "moire" spleen
    paint(spleen, hu_of["spleen"] + spleen_amp * smooth_field(rng, shape, spacing, 6.0))
    if rng.random() < 0.85:
        st_c = (z_lk_top - u(10, 40), y0 - u(0.3, 0.5) * ay, u(0.25, 0.45) * inner_ax)
        st_r = (u(40, 65), u(0.25, 0.38) * ay, u(0.22, 0.32) * inner_ax)
        stomach_e = ellipsoid(*st_c, *st_r)
        stomach = cavity & (Z > dome - 5.0) & (stomach_e < 1)
        paint(stomach, hu_of["bowel_wall"])
        lumen = stomach & (stomach_e < 0.75)
        air_level = st_c[1] - st_r[1] * u(-0.2, 0.7)  # gas rises anteriorly (patient supine)
        content = hu_of["fluid"] + (u(150, 400) if protocol.oral_contrast else u(0, 25))
        paint(lumen, content)
        paint(lumen & (Y < air_level), hu_of["air"] + 30.0)

    # ------------------------------------------------------------------ unlabelled lesions in liver and spleen
    # Cysts and solid masses that look like renal tumors but are not kidney: a network must
    # learn where a tumor may be (in or on the kidney), not only what it looks like.
    _paint_organ_lesions(hu, liver | spleen, spacing, protocol, params, rng, Z, Y, X)

    # ------------------------------------------------------------------ pancreas (in front of the aorta / left kidney)
    ao_r = u(9.0, 13.0)
    vb_rx, vb_ry = u(19.0, 25.0), u(14.0, 18.0)
    ao_x, ao_y = u(4.0, 16.0), -vb_ry - ao_r - u(1.0, 6.0)
    z_panc = z_top + u(0.1, 0.5) * max(z_bot - z_top, 30.0)
    panc_y = ao_y - ao_r - u(8.0, 20.0)
    panc = cavity & (np.abs(Z - z_panc) < u(10.0, 18.0)) & (np.abs(Y - panc_y - 0.15 * X) < u(7.0, 12.0)) & (
        X > -u(40, 60)) & (X < 0.6 * inner_ax)
    paint(panc, hu_of["pancreas"] + 6.0 * smooth_field(rng, shape, spacing, 5.0))

    # ------------------------------------------------------------------ bowel loops and colon
    available = cavity & (hu < hu_of["fat"] + 40.0) & (hu > -500) & (Y < frame_posterior_limit(kidneys, frame))
    loops = smooth_field(rng, shape, spacing, (30.0, 9.0, 9.0)) - 0.9 * (Y / ay) - 0.4 * (Z < z_top)
    fill = u(0.3, 0.6)
    if available.any():
        level = float(np.quantile(loops[available], 1.0 - fill))
        lumen = available & (loops > level)
        bwall = available & (loops > level - 0.18) & ~lumen
        kind = smooth_field(rng, shape, spacing, 25.0)
        gas_q, contrast_q = u(-2.0, -0.7), u(0.0, 1.2)
        content = np.where(kind < gas_q, hu_of["air"] + 50.0,
                           np.where((kind > contrast_q) & protocol.oral_contrast, hu_of["fluid"] + u(150, 450),
                                    hu_of["fluid"] + 15.0 + 12.0 * kind)).astype(np.float32)
        paint(lumen, content)
        paint(bwall, hu_of["bowel_wall"])
        for side in (-1.0, 1.0):  # ascending (right) and descending (left) colon
            k = [kk for kk in kidneys if kk.side == side]
            cy = (k[0].centroid[1] - frame.spine_y if k else 0.0) - u(25, 45)
            cx = side * 0.72 * inner_ax
            rr = u(12.0, 22.0)
            tube = ((Y - cy) / rr) ** 2 + ((X - cx) / (1.2 * rr)) ** 2
            colon = cavity & (tube < 1) & (Z > z_top - 20.0 if side < 0 else Z > z_top - 60.0)
            feces = np.where(smooth_field(rng, shape, spacing, 4.0) > u(0.3, 1.5), hu_of["air"] + 100.0, hu_of["fluid"] + 30.0)
            paint(colon, hu_of["bowel_wall"])
            paint(colon & (tube < 0.7), feces.astype(np.float32))

    # ------------------------------------------------------------------ perirenal fat around the kidneys
    if kidney_mask.any():
        margin_mm = u(*params.perirenal_fat_mm)
        reach = [int(np.ceil(1.5 * margin_mm / d)) + 1 for d in spacing]
        (z0, z1), (y0_, y1_), (x0_, x1_) = (
            (max(0, int(np.min(i)) - r), min(n, int(np.max(i)) + r + 1))
            for i, r, n in zip(np.nonzero(kidney_mask), reach, shape))
        box = (slice(z0, z1), slice(y0_, y1_), slice(x0_, x1_))
        dist = np.full(shape, np.inf, dtype=np.float32)
        dist[box] = ndimage.distance_transform_edt(~kidney_mask[box], sampling=spacing)
        margin = margin_mm * (1.0 + 0.4 * smooth_field(rng, shape, spacing, 20.0))
        perirenal = body & (dist < np.maximum(margin, 2.0))
        stranding = np.maximum(smooth_field(rng, shape, spacing, 3.0) - 1.2, 0.0) * u(0, 60)
        paint(perirenal, hu_of["fat"] + 4.0 * fat_texture + stranding)

    # ------------------------------------------------------------------ muscles of the back and psoas
    psoas_by_side: dict[float, tuple[np.ndarray, np.ndarray]] = {}  # radius and centre x per slice, for the ureters
    muscle = hu_of["muscle"] + 4.0 * smooth_field(rng, shape, spacing, 5.0)
    es_r = (u(18.0, 28.0), u(18.0, 28.0))
    for side in (-1.0, 1.0):
        es = body & (depth > fat_t) & ((((Y - (vb_ry + 30.0)) / es_r[0]) ** 2 + ((X - side * u(22, 32)) / es_r[1]) ** 2) < 1)
        paint(es, muscle)
        ql = body & ((((Y - u(18, 30)) / u(9, 14)) ** 2 + ((X - side * u(50, 65)) / u(12, 18)) ** 2) < 1) & (Z > z_top)
        paint(ql, muscle)
        psoas_r = np.clip(4.0 + 16.0 * (Z - (z_top + u(0, 30))) / 130.0, 0.0, 22.0)
        ps_x = side * (vb_rx + 0.8 * psoas_r + 2.0)
        psoas = (((Y + 2.0) / np.maximum(psoas_r, 1e-3)) ** 2 + ((X - ps_x) / np.maximum(1.1 * psoas_r, 1e-3)) ** 2) < 1
        paint(psoas & (psoas_r > 2.0) & body, muscle)
        psoas_by_side[side] = (psoas_r[:, 0, 0], ps_x[:, 0, 0])

    # ------------------------------------------------------------------ spine: bodies, discs, posterior elements
    period, disc_t = u(29.0, 36.0), u(6.0, 10.0)
    phase_z = np.mod(Z + u(0, period), period)
    is_disc = phase_z < disc_t
    sway = 6.0 * np.sin(2 * np.pi * Z / u(300, 600) + u(0, 6.3))
    r_vb = ((Y - sway) / vb_ry) ** 2 + (X / vb_rx) ** 2
    bone_tex = hu_of["bone_cancellous"] + 25.0 * smooth_field(rng, shape, spacing, 3.0)
    paint(r_vb < 1, np.where(is_disc, hu_of["disc"], hu_of["bone_cortex"]).astype(np.float32))
    paint((r_vb < 0.8) & ~is_disc, bone_tex)
    canal_y, canal_r = vb_ry + u(8.0, 11.0), u(7.0, 9.5)
    r_canal = np.hypot(Y - sway - canal_y, X)
    lamina = (phase_z > disc_t + 3.0) & (phase_z < period - 2.0)
    ring = (r_canal < canal_r + u(4.0, 6.0)) & lamina
    spinous = (np.abs(X) < 3.5) & (Y - sway > canal_y) & (Y - sway < canal_y + canal_r + u(22, 32)) & lamina
    transverse = (np.abs(Y - sway - canal_y + 4.0) < 4.0) & (np.abs(X) < vb_rx + u(6, 14)) & (np.abs(phase_z - 0.6 * period) < 2.5)
    paint((ring | spinous | transverse) & body, bone_tex + 180.0)
    paint(r_canal < canal_r, hu_of["csf"])

    # ------------------------------------------------------------------ ribs in the upper slices
    rib_band = (depth > fat_t + 1.0) & (depth < fat_t + u(5.0, 7.0)) & body
    lateral = np.abs(np.cos(theta))
    z_rib_low = z_mid + u(-25.0, 20.0) + 40.0 * lateral - 30.0 * anterior
    rib_period, rib_w = u(24.0, 32.0), u(6.0, 9.0)
    slope = u(25.0, 45.0)
    rib_phase = np.mod(Z + slope * (theta + np.pi / 2) + u(0, rib_period), rib_period)
    ribs = rib_band & (Z < z_rib_low) & (rib_phase < rib_w) & (np.abs(X) > vb_rx + 15.0)
    paint(ribs, hu_of["rib"])

    # ------------------------------------------------------------------ great vessels and renal vessels
    z_bif = z_bot + u(15.0, 60.0)
    below = np.clip((Z - z_bif) / 50.0, 0.0, None)
    aorta = (np.hypot(Y - ao_y, X - ao_x) < ao_r) & (Z <= z_bif)
    for side in (-1.0, 1.0):  # common iliac arteries below the bifurcation
        aorta |= (np.hypot(Y - ao_y + 4.0 * below, X - ao_x - side * (5.0 + 35.0 * below)) < 0.7 * ao_r) & (Z > z_bif)
    paint(aorta & body, hu_of["blood"])
    ivc_x, ivc_y = -u(18.0, 30.0), -vb_ry - u(6.0, 18.0)
    ivc = (((Y - ivc_y) / u(7, 11)) ** 2 + ((X - ivc_x) / u(10, 15)) ** 2 < 1) & (Z <= z_bif + 10.0)
    paint(ivc & body, hu_of["vein"])
    for k in kidneys:
        kz, ky, kx = k.centroid
        hilum_x = kx - k.side * 0.35 * (k.high[2] - k.low[2]) - frame.spine_x
        for target_x, target_y, radius, tissue in ((ao_x, ao_y, u(2.5, 4.0), "blood"), (ivc_x, ivc_y, u(4.0, 6.5), "vein")):
            vz = kz + u(-10, 10)
            seg = _segment_distance(Z, Y, X, (vz, ky - frame.spine_y - 8.0, hilum_x), (vz + u(-5, 5), target_y, target_x))
            # the renal vein is enhanced early (arterial phase) because the kidney returns contrast fast
            value = hu_of[tissue] if tissue == "blood" or protocol.phase == "none" else max(hu_of["vein"], hu_of["blood"] * 0.7)
            paint((seg < radius) & body & ~kidney_mask, value)

    # ------------------------------------------------------------------ iliac wings far below the kidneys
    # The iliacus lines the wing's inner face and the gluteal muscles its outer one: muscle masses
    # of kidney-like density beside bone, which a model must learn are not kidney.
    z_pelvis = z_bot + u(50.0, 90.0)
    for side in (-1.0, 1.0):
        wing_y, wing_x, wing_r, wing_t = u(20, 40), side * u(70, 90), u(28, 38), u(3.0, 5.0)
        wing_rho = np.hypot(Y - wing_y, (X - wing_x) * 0.8)
        in_pelvis = (Z > z_pelvis) & (np.abs(X) > vb_rx + 25.0) & body
        iliacus = in_pelvis & cavity & (wing_rho < wing_r - wing_t) & (Y > wing_y - u(0.6, 1.0) * wing_r)
        paint(iliacus, muscle)
        gluteus = in_pelvis & (depth > fat_t) & (wing_rho > wing_r + wing_t) & (
            wing_rho < wing_r + wing_t + u(15.0, 35.0)) & (Y > wing_y - 0.3 * wing_r)
        paint(gluteus, muscle)
        wing = (np.abs(wing_rho - wing_r) < wing_t) & in_pelvis & (Y > -20.0)
        paint(wing, hu_of["rib"] + 80.0)

    # ------------------------------------------------------------------ adrenals and splenic lobules
    # Drawn from a child generator so that every earlier draw, hence every earlier phantom's
    # anatomy, stays as it was.
    _paint_suprarenal_negatives(hu, kidney_mask, body & ~spleen, spleen, frame, protocol, params,
                                rng.spawn(1)[0], Z, Y, X)

    # ------------------------------------------------------------------ renal pelvis and ureters
    # From a second child generator, and only when asked: phantoms without them stay bit for bit,
    # and one drawn with them differs from its twin without them only there.
    if params.ureter_probability > 0:
        ureter_rng = rng.spawn(1)[0]
        for k in kidneys:
            if ureter_rng.uniform() < params.ureter_probability:
                psoas = psoas_by_side[float(np.sign(k.side))]
                collecting = _collecting_system(Z, Y, X, k, frame, psoas, ureter_rng)
                # Through fat only: the pelvis and ureter push fat aside, not muscle, bone or bowel.
                in_fat = (hu < hu_of["fat"] + 50.0) & (hu > -500.0)  # not bowel gas either
                paint(collecting & in_fat & body & ~kidney_mask, hu_of["urine"] + float(ureter_rng.uniform(-4.0, 8.0)))
    return hu


def frame_posterior_limit(kidneys: tuple[KidneyInfo, ...], frame: Frame) -> float:
    """Bowel stays in front of the kidneys' centres (Y, from the vertebral body)."""
    if not kidneys:
        return 0.0
    return float(np.mean([k.centroid[1] for k in kidneys]) - frame.spine_y)


def _collecting_system(Z, Y, X, kidney: KidneyInfo, frame: Frame, psoas: tuple[np.ndarray, np.ndarray],
                       rng: np.random.Generator) -> np.ndarray:
    """The renal pelvis leaving the hilum and the ureter running down on the psoas (coarse grid).

    Urine-filled, so water-dense (about 0-15 HU) except in the excretory phase, when it is
    opacified. Its part outside the kidney mask is what a model must learn is not tumor: at the
    hilum an extrarenal pelvis is a water-dense bulge medial to the kidney, as a cystic or necrotic
    tumor would be. The hilum faces the spine, behind the renal vessels (vein, artery, pelvis from
    front to back); the pelvis narrows into the ureter within a few centimetres.
    """
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    kz, ky, kx = kidney.centroid
    width = kidney.high[2] - kidney.low[2]
    medial = -float(np.sign(kidney.side))  # towards the spine along x
    ky, kx = ky - frame.spine_y, kx - frame.spine_x
    hilum = (kz + u(-8.0, 8.0), ky + u(-2.0, 6.0), kx + medial * 0.35 * width)
    inside = (hilum[0], hilum[1], kx + medial * u(0.0, 0.2) * width)
    pelvis_r, ureter_r = u(4.0, 12.0), u(1.5, 3.0)
    funnel_end = (hilum[0] + u(5.0, 20.0), hilum[1] - u(0.0, 8.0), hilum[2] + medial * u(5.0, 25.0))
    collecting = _cone(Z, Y, X, inside, hilum, pelvis_r, pelvis_r)
    collecting |= _cone(Z, Y, X, hilum, funnel_end, pelvis_r, ureter_r)
    # The ureter: along the front of the psoas, slightly medial of its centre, down to the grid's end.
    psoas_r, psoas_x = psoas
    ureter_y = -2.0 - np.maximum(psoas_r, 3.0) - ureter_r - 1.0
    ureter_x = psoas_x + medial * 0.3 * psoas_r
    z = Z[:, 0, 0]
    below = np.flatnonzero(z > funnel_end[0] + 15.0)
    if below.size == 0:
        return collecting
    top = int(below[0])
    collecting |= _cone(Z, Y, X, funnel_end, (z[top], ureter_y[top], ureter_x[top]), ureter_r, ureter_r)
    along = np.hypot(Y - ureter_y[:, None, None], X - ureter_x[:, None, None]) < ureter_r
    return collecting | (along & (Z >= z[top]))


def _cone(Z, Y, X, a, b, radius_a: float, radius_b: float) -> np.ndarray:
    """Voxels within the truncated cone around segment a-b, radius ``radius_a`` at a, ``radius_b`` at b."""
    distance, t = _along_segment(Z, Y, X, a, b)
    return distance < radius_a + (radius_b - radius_a) * t


def _segment_distance(Z, Y, X, a, b) -> np.ndarray:
    """Distance (mm) from every voxel to the segment a-b (points as (z, y, x) mm)."""
    return _along_segment(Z, Y, X, a, b)[0]


def _along_segment(Z, Y, X, a, b) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) from every voxel to the segment a-b, and where along it (0 at a, 1 at b) is nearest."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    d = b - a
    length2 = float(d @ d) or 1.0
    t = np.clip(((Z - a[0]) * d[0] + (Y - a[1]) * d[1] + (X - a[2]) * d[2]) / length2, 0.0, 1.0)
    return np.sqrt((Z - a[0] - t * d[0]) ** 2 + (Y - a[1] - t * d[1]) ** 2 + (X - a[2] - t * d[2]) ** 2), t


def _paint_suprarenal_negatives(hu: np.ndarray, kidney_mask: np.ndarray, body: np.ndarray, spleen: np.ndarray,
                                frame: Frame, protocol: Protocol, params: PhantomParams, rng: np.random.Generator,
                                Z, Y, X) -> None:
    """Unlabelled soft tissue just above and medial to the kidneys' upper poles.

    There stage 1 expects kidney, and real scans show adrenal glands (thin limbs in an inverted
    V or Y, sometimes with a nodule) and the spleen's lobulated medial tip: kidney-dense shapes
    that are not kidney. Without them a model marks such tissue as kidney on real CT.
    """
    near_kidney = ndimage.binary_dilation(kidney_mask, iterations=2)
    free = np.broadcast_to(body, hu.shape) & ~near_kidney
    gain = max(protocol.hu["kidney_cortex"] - 32.0, 0.0)  # how strongly this phase enhances
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    for kidney in frame.kidneys:
        if rng.random() >= params.adrenal_probability:
            continue
        side = kidney.side
        kz, ky, kx = kidney.centroid
        medial_x = kx - side * 0.3 * (kidney.high[2] - kidney.low[2]) - frame.spine_x
        apex = (ky - frame.spine_y - u(8.0, 22.0), medial_x - side * u(0.0, 12.0))
        z_top, z_bottom = kidney.low[0] - u(15.0, 35.0), kidney.low[0] + u(0.0, 20.0)
        in_range = (Z > z_top) & (Z < z_bottom)
        gland = np.zeros(hu.shape, bool)
        for dy, dx in ((u(15.0, 30.0), -side * u(2.0, 10.0)), (u(12.0, 25.0), side * u(4.0, 14.0))):
            limb = _segment_distance(0.0, Y, X, (0.0, *apex), (0.0, apex[0] + dy, apex[1] + dx))  # in-plane
            gland |= np.broadcast_to((limb < u(1.8, 3.5)) & in_range, hu.shape)
        value = u(20.0, 45.0) + u(0.3, 0.6) * gain
        hu[gland & free] = value
        if rng.random() < params.adrenal_nodule_probability:  # adenoma: round, often fat-rich (low HU)
            radius = u(6.0, 18.0)
            nodule = _ball(Z, Y, X, (u(z_top, z_bottom), apex[0] + u(5.0, 15.0), apex[1]), radius, hu.shape)
            hu[nodule & free] = u(-10.0, 40.0) + u(0.1, 0.8) * gain
    if spleen.any() and rng.random() < params.adrenal_probability:
        # A lobule on the spleen's posterior-medial tip, towards the left kidney's upper pole.
        z, y, x = (axis.ravel() for axis in (Z, Y, X))
        iz, iy, ix = np.nonzero(spleen)
        tip = int(np.argmax(y[iy] - np.abs(x[ix])))
        radius = u(8.0, 20.0)
        centre = (float(z[iz[tip]]) + u(-10.0, 20.0), float(y[iy[tip]]), float(x[ix[tip]]) - radius * u(0.4, 0.9))
        hu[_ball(Z, Y, X, centre, radius, hu.shape) & free] = float(np.median(hu[spleen]))


def _ball(Z, Y, X, centre, radius: float, shape) -> np.ndarray:
    """A ball of ``radius`` mm around ``centre`` (z, y, x mm), as a (read-only) mask of ``shape``."""
    return np.broadcast_to((Z - centre[0]) ** 2 + (Y - centre[1]) ** 2 + (X - centre[2]) ** 2 < radius ** 2, shape)


def _paint_organ_lesions(hu: np.ndarray, organ: np.ndarray, spacing, protocol: Protocol, params: PhantomParams,
                         rng: np.random.Generator, Z, Y, X) -> None:
    """Paint 0-4 unlabelled focal lesions (cysts, solid masses with renal-tumor looks) in ``organ``."""
    if not organ.any() or rng.random() >= params.organ_lesion_probability:
        return
    candidates = np.argwhere(organ)
    texture = smooth_field(rng, hu.shape, spacing, float(rng.uniform(2.0, 7.0)))
    cortex_gain = max(protocol.hu["kidney_cortex"] - 32.0, 0.0)
    for _ in range(1 + min(int(rng.poisson(1.0)), 3)):
        iz, iy, ix = candidates[rng.integers(len(candidates))]
        radius = float(rng.uniform(4.0, 30.0)) * np.asarray(rng.uniform(0.75, 1.25, 3), np.float32)
        r2 = (((Z - float(Z.ravel()[iz])) / radius[0]) ** 2 + ((Y - float(Y.ravel()[iy])) / radius[1]) ** 2
              + ((X - float(X.ravel()[ix])) / radius[2]) ** 2)
        lesion = np.broadcast_to(r2 < 1.0, hu.shape) & organ
        if rng.random() < 0.4:  # simple cyst: water density, sharp wall
            hu[lesion] = float(rng.uniform(-5.0, 20.0))
            continue
        look = sample_tumor_look(rng, protocol, params)
        value = look.unenhanced_hu + look.enhancement_ratio * cortex_gain + look.heterogeneity_hu * texture
        if look.necrosis:
            value = np.where(np.broadcast_to(r2, hu.shape) < look.necrosis_fraction ** 2, look.necrosis_hu + 5.0 * texture, value)
        hu[lesion] = value[lesion]
