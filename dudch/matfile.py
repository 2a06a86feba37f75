"""MATLAB .mat files, v5 (scipy) and v7.3 (HDF5, h5py) alike, read in MATLAB's axis order.

HDF5 stores a MATLAB array with its axes reversed (MATLAB is column-major): the Cleared-Set's
`IAll`, 224 x 224 x 3 x 20015 in MATLAB, reads as (20015, 3, 224, 224) from HDF5. `Variable`
undoes that, and reads large arrays lazily, a block of rows at a time, so a 28 GB NUS-WIDE
`IAll` never has to fit in memory.
"""

from pathlib import Path

import numpy as np

from dudch import DudchError, first_line


def is_hdf5(path):
    import h5py

    return h5py.is_hdf5(str(path))


def names(path):
    """{variable name: shape in MATLAB order} of a .mat file."""
    path = Path(path)
    try:
        if is_hdf5(path):
            import h5py

            with h5py.File(path, "r") as f:
                return {k: tuple(v.shape[::-1]) for k, v in f.items() if hasattr(v, "shape")}
        from scipy.io import whosmat

        return {name: tuple(shape) for name, shape, _ in whosmat(str(path))}
    except Exception as error:  # scipy and h5py raise many types for a damaged file
        raise DudchError(f"cannot read {path} ({first_line(error)}): the file is truncated or not a "
                         f"MATLAB .mat file; download it again") from None


class Variable:
    """One array of a .mat file. `shape` is in MATLAB order; `take(axis, start, stop)` reads the
    slice start:stop along MATLAB axis `axis` and returns it in MATLAB axis order."""

    def __init__(self, path, name):
        self.path, self.name = Path(path), name
        self.hdf5 = is_hdf5(self.path)
        shapes = names(self.path)
        if name not in shapes:
            raise DudchError(f"{self.path} has no variable {name!r} (it has: "
                             f"{', '.join(sorted(shapes)) or 'none'}); check the file")
        self.shape = shapes[name]
        self._loaded = None

    def take(self, axis, start, stop):
        try:
            if self.hdf5:
                import h5py

                with h5py.File(self.path, "r") as f:
                    index = [slice(None)] * len(self.shape)
                    index[len(self.shape) - 1 - axis] = slice(start, stop)
                    return np.asarray(f[self.name][tuple(index)]).transpose()
            if self._loaded is None:
                from scipy.io import loadmat

                self._loaded = loadmat(str(self.path), variable_names=[self.name])[self.name]
            index = [slice(None)] * len(self.shape)
            index[axis] = slice(start, stop)
            return self._loaded[tuple(index)]
        except DudchError:
            raise
        except Exception as error:
            raise DudchError(f"cannot read {self.name} from {self.path} ({first_line(error)}): the file "
                             f"is truncated or damaged; download it again") from None

    def read(self):
        """The whole array, MATLAB order."""
        return self.take(0, 0, self.shape[0])
