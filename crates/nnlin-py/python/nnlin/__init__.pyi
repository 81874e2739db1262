import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

Rows = Union[None, str, Sequence[int]]

class Explanation:
    W: npt.NDArray[np.floating]
    b: npt.NDArray[np.floating]
    output: npt.NDArray[np.float64]
    rows: npt.NDArray[np.int64]
    residual: npt.NDArray[np.float64]
    predicted: npt.NDArray[np.int64]

class Operator:
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def dtype(self) -> type: ...
    @property
    def rows(self) -> list[int]: ...
    def matvec(self, v: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
    def rmatvec(self, u: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
    def svd(self, k: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...

class Model:
    def __init__(self, source: Union[str, os.PathLike, bytes]) -> None: ...
    @property
    def input_shape(self) -> tuple[int, ...]: ...
    @property
    def output_len(self) -> int: ...
    def explain(
        self,
        x: npt.ArrayLike,
        rows: Rows = None,
        mode: str = "tangent",
        precision: str = "f64",
        strategy: str = "auto",
        threads: Optional[int] = None,
        batch: Union[str, int, None] = None,
    ) -> Explanation: ...
    def operator(self, x: npt.ArrayLike, rows: Rows = None, mode: str = "tangent") -> Operator: ...
    def region(
        self,
        x: npt.ArrayLike,
        norm: str = "both",
        verify: int = 0,
        input_box: Optional[tuple[float, float]] = None,
        threads: Optional[int] = None,
    ) -> list[dict[str, Any]]: ...
    def decompose(
        self, X: npt.ArrayLike, y: npt.ArrayLike, mode: str = "tangent", threads: Optional[int] = None
    ) -> dict[str, float]: ...
