"""CCA-ITQ (Gong & Lazebnik, 2011 / 2013), the classic unsupervised cross-modal baseline.

Each modality is reduced by PCA (scikit-learn's iterative CCA is impractically slow on
1000+-dimensional inputs), the two are projected onto their top `bits` canonical directions
(scikit-learn CCA), and one ITQ rotation, learned on both modalities' projections together,
turns the shared space into binary codes: sign(project(x) R).
"""

import numpy as np
from sklearn.cross_decomposition import CCA
from sklearn.decomposition import PCA

from dudch.nets import check_pairs, sign


def itq_rotation(values, iterations=50, seed=0):
    """Iterative quantisation: the orthogonal R (k x k) minimising ||sign(V R) - V R||^2 for
    centred V (n x k)."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((values.shape[1], values.shape[1])))
    for _ in range(iterations):
        codes = sign(values @ rotation).astype(np.float64)
        u, _, vt = np.linalg.svd(values.T @ codes)
        rotation = u @ vt
    return rotation


class CCAITQ:
    """fit(image, text) on training pairs; encode_image / encode_text give int8 (n, bits) codes."""

    def __init__(self, bits, pca_dim=256, seed=0):
        self.bits, self.pca_dim, self.seed = bits, pca_dim, seed

    def fit(self, image, text):
        image, text = check_pairs(image, text)
        dim = lambda x: min(max(self.pca_dim, self.bits), x.shape[1], len(x) - 1)
        self.pca_image = PCA(dim(image), random_state=self.seed).fit(image)
        self.pca_text = PCA(dim(text), random_state=self.seed).fit(text)
        self.cca = CCA(n_components=self.bits, max_iter=1000)
        self.cca.fit(self.pca_image.transform(image), self.pca_text.transform(text))
        projected = np.vstack(self._project(image, text))
        self.mean = projected.mean(axis=0)
        self.rotation = itq_rotation(projected - self.mean, seed=self.seed)
        return self

    def _project(self, image, text):
        return self.cca.transform(self.pca_image.transform(image), self.pca_text.transform(text))

    def encode_image(self, image):
        dummy_text = np.zeros((len(image), self.pca_text.n_features_in_), dtype=np.float32)
        return sign((self._project(image, dummy_text)[0] - self.mean) @ self.rotation)

    def encode_text(self, text):
        dummy_image = np.zeros((len(text), self.pca_image.n_features_in_), dtype=np.float32)
        return sign((self._project(dummy_image, text)[1] - self.mean) @ self.rotation)
