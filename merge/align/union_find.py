"""Union-find over permutation variables, with FIXED as the variable that never moves.

Spec inference (`merge.align.infer`) makes a variable for each new feature axis (the output of
a Linear, a Conv, an Embedding), unites the variables that must be permuted together (residual
adds, q·k contractions, tied weights) and fixes those that must not move. A variable may also be
*coarse*: its permutation moves whole blocks of k units of another (GroupNorm groups, attention
heads); `coarsen`, `settle` and `resolve` keep the two in step.
"""

from __future__ import annotations

import math

FIXED = 0  # the variable of every axis that is not permuted


class UnionFind:
    """Union-find over permutation variables. `coarse[r] = (h, k)` says r's permutation moves
    whole blocks of k units, as h's (size / k) does: GroupNorm groups, attention heads."""

    def __init__(self) -> None:
        self.parent = [FIXED]
        self.sizes = [0]
        self.labels = ["FIXED"]
        self.members: dict[int, list[int]] = {FIXED: [FIXED]}
        self.reason: dict[int, str] = {}
        self.coarse: dict[int, tuple[int, int]] = {}

    def new(self, size: int, label: str) -> int:
        v = len(self.parent)
        self.parent.append(v)
        self.sizes.append(size)
        self.labels.append(label)
        self.members[v] = [v]
        return v

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def fix(self, v: int, reason: str) -> None:
        r = self.find(v)
        if r == FIXED:
            return
        for m in self.members[r]:
            self.reason.setdefault(m, reason)
        link = self.coarse.pop(r, None)
        self._link(FIXED, r)
        if link:
            self.fix(link[0], reason)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb == FIXED:
            ra, rb, a, b = rb, ra, b, a
        if ra == FIXED:
            self.fix(rb, self.reason.get(a, "shares a permutation with a fixed axis"))
            return
        if self.sizes[ra] != self.sizes[rb]:
            why = f"two axes of sizes {self.sizes[ra]} and {self.sizes[rb]} meet in one permutation"
            self.fix(ra, why)
            self.fix(rb, why)
            return
        la, lb = self.coarse.pop(ra, None), self.coarse.pop(rb, None)
        root = min(ra, rb)
        self._link(root, max(ra, rb))
        if la and lb:
            k = math.lcm(la[1], lb[1])
            h1, h2 = self.coarsen(la[0], k // la[1]), self.coarsen(lb[0], k // lb[1])
            self.union(h1, h2)
            if self.find(root) != FIXED:
                self.coarse[self.find(root)] = (h1, k)
        elif la or lb:
            self.coarse[root] = la or lb  # type: ignore[assignment]

    def coarsen(self, v: int, k: int) -> int:
        """A variable h with v's permutation = h's, each of h's units k consecutive units of v."""
        r = self.find(v)
        if k == 1 or r == FIXED:
            return r
        size = self.sizes[r]
        if size % k:
            self.fix(r, f"{size} units cannot move in blocks of {k}")
            return FIXED
        if r not in self.coarse:
            h = self.new(size // k, self.labels[r])
            self.coarse[r] = (h, k)
            return h
        h0, k0 = self.coarse[r]
        if k % k0 == 0:
            return self.coarsen(h0, k // k0)
        top = math.lcm(k, k0)
        if size % top:
            self.fix(r, f"{size} units cannot move in blocks of both {k} and {k0}")
            return FIXED
        h_top = self.coarsen(h0, top // k0)
        h = self.new(size // k, self.labels[r])
        self.coarse[h] = (h_top, top // k)
        return h

    def settle(self) -> None:
        """A fixed coarse variable fixes its fine one and vice versa, until nothing changes."""
        changed = True
        while changed:
            changed = False
            for r, (h, _) in list(self.coarse.items()):
                fr, fh = self.find(r), self.find(h)
                if (fr == FIXED) != (fh == FIXED):
                    if fr == FIXED:
                        self.fix(h, self.reason.get(r, "its blocks are fixed"))
                    else:
                        self.fix(r, self.reason.get(h, "its blocks are fixed"))
                    changed = True

    def resolve(self, v: int) -> tuple[int, int]:
        """(root, k): v's permutation is the root's, each root unit k units of v wide."""
        r, k = self.find(v), 1
        while r in self.coarse:
            h, f = self.coarse[r]
            r, k = self.find(h), k * f
        return r, k

    def _link(self, root: int, child: int) -> None:
        self.parent[child] = root
        self.members[root].extend(self.members.pop(child))
