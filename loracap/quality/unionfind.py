"""Union-find (disjoint sets) over 0..n-1, shared by the caption and image duplicate checks.

Plain Python on purpose: the text checks must not pay for a numpy import.
"""

from __future__ import annotations


class UnionFind:
    """Disjoint sets of 0..n-1. A set's root is always its smallest member, so `groups()` comes out in
    order of each group's first index, whatever order the unions happened in."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving keeps the trees flat
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> dict[int, list[int]]:
        """root -> members in increasing order, for every set (singletons included)."""
        members: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            members.setdefault(self.find(i), []).append(i)
        return members
