"""The released ScaleKV budget files, pinned (the files themselves are not copied into the repository).

StargazerX0/ScaleKV @ eb0615a100fa8a3ae59aef122e2107ba528b1341, ``budgets/2b_10%_budget.json`` and
``budgets/8b_10%_budget.json``, every entry: ``{"Scale k": (Max, Min, Limit, High, drafter blocks)}`` (the files
flag the drafter blocks ``"Block b": 1`` and every other block 0).
"""
RELEASED_2B_10 = {9: (920, 632, 921, 2, {0, 23}), 10: (1490, 594, 1496, 2, {0, 23}), 11: (2510, 526, 2514, 2, {0, 23}),
                  12: (4100, 420, 4110, 2, {0, 23}), 13: (6385, 465, 6404, 1, {0})}
RELEASED_8B_10 = {9: (909, 629, 921, 3, {0, 1, 2}), 10: (1464, 584, 1485, 3, {0, 1, 2}),
                  11: (2463, 503, 2488, 3, {0, 1, 2}), 12: (4054, 374, 4063, 3, {0, 1, 2}),
                  13: (6200, 200, 6358, 3, {0, 1, 2})}


def released_file(depth, table):
    """A budget file in the release's format (key order as released: blocks, High, Max, Min, Limit)."""
    return {f"Scale {k}": {**{f"Block {b}": int(b in drafters) for b in range(depth)}, "High": high, "Max": mx,
                           "Min": mn, "Limit": limit}
            for k, (mx, mn, limit, high, drafters) in table.items()}
