"""Stage 3: reconstruct a symmetric similarity matrix from the teacher (the distilled
knowledge that replaces manual labels).

The joint cosine similarity across both modalities,
    S^ = (cos(H_I,H_I) + cos(H_T,H_T) + cos(H_I,H_T) + cos(H_T,H_I)) / 4,
is an inner product: with z = (h_I/|h_I| + h_T/|h_T|) / 2, S^_ij = z_i . z_j. So the n x n
matrix is never built: the graph keeps Z (n x k) plus thresholds, and produces any block of
rows of S on demand, in chunks. S is an affinity in [0, 1] given as integer levels
0..`levels` (affinity = level / levels). Rules, each symmetric by construction:
  mutual_knn: 1 iff j is among i's k nearest and i among j's   (s >= max(t_i, t_j));
  union_knn:  1 iff either is among the other's k nearest       (s >= min(t_i, t_j));
  quantile:   1 iff s >= t, the (1 - q) quantile of S^ over a seeded sample of pairs;
  graded:     two levels: 1 for union_knn neighbours, 1/2 for the other pairs above the
              `related_fraction` quantile, 0 for the rest. The nearest neighbours say who is
              alike (what the first results need); the quantile level keeps the coarse
              structure of the whole ranking, which a sparse graph alone loses.
t_i is the k-th largest entry of row i of S^ (i itself included). The student turns the
affinity into its regression targets (with ADSH's class balance, `dudch.student`).

Sources of the embedding (`embedding`): the teacher's hash-layer outputs (METHOD.md's formula
above), its deep features (the activations below each hash layer: the frozen backbone features
on the image side, the 4096-d hidden layer on the text side), both, or the raw input features
(no teacher: the no-distillation ablation). Modalities in different spaces are concatenated,
z = [x/|x|, y/|y|] / sqrt(2), so that S^ is the mean of the within-modality cosines.

The graph also keeps the teacher's joint codes sign(z_hash) of the database items, which the
student can start its database codes from (`teacher_codes`).
"""

import numpy as np

from dudch import DudchError

RULES = ("mutual_knn", "union_knn", "quantile", "graded")
SOURCES = ("hash", "deep", "both", "raw")
GRID = 4096.0  # z in [-1, 1] -> integers in [-4096, 4096]


def _unit(h):
    h = np.asarray(h, dtype=np.float32)
    return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)


def _concatenated(*views):
    return np.hstack([_unit(v) for v in views]) / np.sqrt(len(views))


def embedding(source, image, text, teacher=None):
    """(z, teacher codes): the joint embedding z (float32, (n, d)) of paired items from `source`
    (one of SOURCES) and the teacher's joint codes sign(z_hash), int8 (n, bits) in {-1, +1}
    (None for 'raw'). `teacher` (HashNets) is needed for every source but 'raw'."""
    from dudch.nets import hash_outputs, hidden_features, sign

    if source not in SOURCES:
        raise DudchError(f"unknown similarity source {source!r}; use one of {', '.join(SOURCES)}")
    if source == "raw":
        return _concatenated(image, text), None
    hashed = joint_embedding(*hash_outputs(teacher, image, text))
    codes = sign(hashed)
    if source == "hash":
        return hashed, codes
    deep = _concatenated(*hidden_features(teacher, image, text))
    return (deep if source == "deep" else _concatenated(hashed, deep)), codes


def joint_embedding(h_image, h_text):
    """z = (normalise(h_image) + normalise(h_text)) / 2, float32 (n, k): S^ = Z Z^T."""
    if np.shape(h_image) != np.shape(h_text):
        raise DudchError(f"teacher outputs differ in shape: image {np.shape(h_image)}, text "
                         f"{np.shape(h_text)}; retrain the teacher")
    return (_unit(h_image) + _unit(h_text)) / 2


class SimilarityGraph:
    """Symmetric similarity over n items, computed in row chunks.

    z: float32 (n, d) joint embedding; rule in RULES; parameter: neighbours k for the kNN rules
    and `graded` (an int >= 1), the fraction q of similar pairs for `quantile` (0 < q < 1);
    related_fraction: the fraction of pairs at level 1/2 or above for `graded` (0 < q < 1);
    teacher_codes: int8 (n, bits), the teacher's joint codes (kept for the student's start).
    """

    def __init__(self, z, rule="graded", parameter=50, related_fraction=0.2, teacher_codes=None,
                 chunk_rows=None, seed=0):
        if rule not in RULES:
            raise DudchError(f"unknown similarity rule {rule!r}; use one of {', '.join(RULES)}")
        # On an integer grid, inner products in float64 are exact sums of integers, so
        # S^_ij == S^_ji bit for bit whatever the chunking: exact symmetry, not nearly.
        self.z = np.round(np.asarray(z, dtype=np.float64) * GRID)
        n = len(self.z)
        self.rule, self.parameter = rule, parameter
        self.related_fraction = related_fraction if rule == "graded" else 0.0
        self.levels = 2 if rule == "graded" else 1
        self.teacher_codes = teacher_codes
        self.chunk_rows = chunk_rows or _chunk_rows(n)
        self.cutoff = -np.inf  # graded: the related level's threshold on S^
        if rule == "quantile":
            self.thresholds = np.full(n, self._quantile(parameter, seed))
        else:
            k = int(parameter)
            if not 1 <= k <= n:
                raise DudchError(f"{rule} needs 1 <= neighbours <= {n} items, got {parameter}")
            self.thresholds = np.empty(n)
            step = self.chunk_rows
            for start in range(0, n, step):
                block = self.z[start:start + step] @ self.z.T
                self.thresholds[start:start + step] = -np.partition(-block, k - 1, axis=1)[:, k - 1]
            if rule == "graded":
                self.cutoff = self._quantile(related_fraction, seed)

    def _quantile(self, fraction, seed):
        """The (1 - fraction) quantile of S^ over a seeded sample of 200,000 pairs."""
        if not 0 < fraction < 1:
            raise DudchError(f"a fraction of similar pairs must be in (0, 1), got {fraction}")
        rng = np.random.default_rng(seed)
        i, j = rng.integers(0, len(self.z), 200_000), rng.integers(0, len(self.z), 200_000)
        # in chunks of pairs: for a wide z (UCCH's 8192-d deep features) all 200,000 at once
        # would take tens of GB
        step = max(1, 2**24 // self.z.shape[1])
        values = np.concatenate([np.einsum("ij,ij->i", self.z[i[s:s + step]], self.z[j[s:s + step]])
                                 for s in range(0, len(i), step)])
        return np.quantile(values, 1 - fraction, method="lower")

    def __len__(self):
        return len(self.z)

    def rows(self, index):
        """S[index, :] as int8 levels (len(index), n) in 0..self.levels (affinity = level / levels)."""
        index = np.asarray(index)
        out = np.empty((len(index), len(self.z)), dtype=np.int8)
        for start in range(0, len(index), self.chunk_rows):
            rows = index[start:start + self.chunk_rows]
            scores = self.z[rows] @ self.z.T
            t_row, t_col = self.thresholds[rows][:, None], self.thresholds[None, :]
            if self.rule == "mutual_knn":
                similar = scores >= np.maximum(t_row, t_col)
            elif self.rule in ("union_knn", "graded"):
                similar = scores >= np.minimum(t_row, t_col)
            else:
                similar = scores >= t_row
            level = similar.astype(np.int8)
            if self.rule == "graded":
                level = level + (scores >= self.cutoff)  # 2: neighbours, 1: related, 0: neither
            out[start:start + len(rows)] = level
        return out

    def density(self, sample_rows=1000, seed=0):
        """Fraction of pairs at the top level (similar), estimated on a seeded sample of rows."""
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(self.z), size=min(sample_rows, len(self.z)), replace=False)
        return float((self.rows(rows) == self.levels).mean())

    def save(self, path):
        from dudch.storage import save_npz

        codes = {} if self.teacher_codes is None else dict(teacher_codes=self.teacher_codes)
        save_npz(path, z=self.z, thresholds=self.thresholds, rule=np.array(self.rule),
                 parameter=np.array(self.parameter, dtype=np.float64),
                 related_fraction=np.array(self.related_fraction), cutoff=np.array(self.cutoff), **codes)

    @classmethod
    def load(cls, path):
        try:
            with np.load(path) as saved:
                graph = cls.__new__(cls)
                graph.z, graph.thresholds = saved["z"], saved["thresholds"]
                graph.rule, graph.parameter = str(saved["rule"]), float(saved["parameter"])
                graph.related_fraction, graph.cutoff = float(saved["related_fraction"]), float(saved["cutoff"])
                graph.teacher_codes = saved["teacher_codes"] if "teacher_codes" in saved else None
        except (OSError, KeyError, ValueError) as error:
            raise DudchError(f"cannot read similarity graph {path} ({error}); rerun the "
                             f"similarity stage") from None
        graph.levels = 2 if graph.rule == "graded" else 1
        graph.chunk_rows = _chunk_rows(len(graph.z))
        return graph


DEFAULT_RULE, DEFAULT_SOURCE = "graded", "hash"
RELATED_FRACTION = 0.2  # graded: pairs at level 1/2 or above
NEIGHBOUR_FRACTION = 0.01  # kNN rules: neighbours per item as a fraction of the items


def _chunk_rows(n):
    """Rows per chunk so that a chunk x n float64 block stays near 128 MiB."""
    return max(1, min(1024, 2**24 // n))


def default_parameter(rule, n):
    """The rule's parameter when none is given: RELATED_FRACTION of pairs for `quantile`,
    NEIGHBOUR_FRACTION x n neighbours for the kNN rules and `graded`."""
    return RELATED_FRACTION if rule == "quantile" else max(1, round(NEIGHBOUR_FRACTION * n))
