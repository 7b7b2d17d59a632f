"""Frontiers: per method (diffc's cache pass at any settings, each peer across its settings), the
best speed-up it reaches at each fidelity level, read off the upper envelope of its points."""
from __future__ import annotations

from typing import Any

LEVELS_DB = (30.0, 35.0, 40.0)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speed-up, PSNR) points no other point beats on both, by rising speed-up."""
    best: list[tuple[float, float]] = []
    for speedup, quality in sorted(points, key=lambda point: (-point[1], -point[0])):
        if not best or speedup > best[-1][0]:
            best.append((speedup, quality))
    return sorted(best)


def speedup_at(points: list[tuple[float, float]], level: float) -> float | None:
    """The largest speed-up at PSNR >= level a method reaches with one of its settings, or with two
    mixed over the images: one that reaches the level on a share of them and a faster one that does
    not on the rest (`mixed_speedup`), so measuring one more setting never lowers the figure. None
    when no point reaches the level; the unoptimized model's exact images are not mixed."""
    front = pareto(points)
    reaching = [point for point in front if point[1] >= level]
    if not reaching:
        return None
    best = max(speedup for speedup, _ in reaching)
    for point in reaching:
        if point[1] != float("inf"):
            best = max([best, *(mixed_speedup(point, faster, level) for faster in front
                                if faster[0] > point[0] and faster[1] < level)])
    return best


def mixed_speedup(slow: tuple[float, float], fast: tuple[float, float], level: float) -> float:
    """The speed-up of running the (speed-up, PSNR) setting `slow` on a share of the images and `fast`
    on the rest, the share such that the images' mean squared error (from which their PSNR is read)
    is the level's: time per image and squared error both average over the images."""
    (slow_speedup, slow_psnr), (fast_speedup, fast_psnr) = slow, fast
    slow_mse, fast_mse, level_mse = (10 ** (-psnr / 10) for psnr in (slow_psnr, fast_psnr, level))
    fast_share = (level_mse - slow_mse) / (fast_mse - slow_mse)
    return 1 / ((1 - fast_share) / slow_speedup + fast_share / fast_speedup)


def frontiers(rows: dict[str, dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Method family -> its (speed-up, PSNR) points; only rows that ran and changed the images.
    The baseline point (1x, identical) belongs to every family."""
    families: dict[str, list[tuple[float, float]]] = {}
    for row in rows.values():
        if row["kind"] == "baseline" or row["status"] != "ok" or row["speedup"] is None or row["psnr"] is None:
            continue
        families.setdefault(row["details"].get("family", row["pipeline"]), []).append((row["speedup"], row["psnr"]))
    return {family: [(1.0, float("inf")), *points] for family, points in families.items()}


# diffc's cache pass is one method whether its segments run eagerly or under torch.compile (an option
# of its torch backend); the peers' compiled variants (torchao) are compared with it too
OURS = ("diffc cache", "diffc cache + torch.compile")


def comparison(rows: dict[str, dict[str, Any]], ours: tuple[str, ...] = OURS) -> dict[str, Any]:
    """Speed-up at each level for the union of the `ours` families and for the best peer, with
    which peer that is."""
    fronts = frontiers(rows)
    diffc_points = sorted({point for family in ours for point in fronts.get(family, [(1.0, float("inf"))])})
    peer_families = {row["details"].get("family") for row in rows.values() if row["kind"] == "peer"}
    table = {}
    for level in LEVELS_DB:
        peers = {family: speedup_at(points, level) for family, points in fronts.items() if family in peer_families}
        reached = {family: value for family, value in peers.items() if value is not None}
        best_peer = max(reached, key=reached.get) if reached else None
        # with no row that ran and changed the images, diffc's frontier is the unoptimized model alone
        diffc = speedup_at(diffc_points, level)
        table[f"{level:g}"] = {"diffc": diffc, "best_peer": best_peer,
                               "best_peer_speedup": reached.get(best_peer) if best_peer else None,
                               "diffc_wins": None if best_peer is None else (diffc or 0.0) >= reached[best_peer]}
    return {"ours": " / ".join(ours), "levels": table}
