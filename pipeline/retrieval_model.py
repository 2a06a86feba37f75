"""The registered retrieval model, logged as MLflow "models from code": MLflow runs this file
to build the model when it is loaded, so nothing is pickled. Its one artifact, "retriever", is
a `dudch.retrieval` folder (student networks, encoders, bit-packed database codes)."""

import mlflow
import numpy as np
import pandas as pd

from dudch import DudchError

QUERY_COLUMNS = ("text", "image", "text_features", "image_features")


class RetrievalModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of `dudch.retrieval.Retriever`.

    predict(DataFrame) takes one query per row in exactly one column: "text" (str), "image" (a
    file path), "text_features" or "image_features" (a list of floats). It returns a DataFrame
    with "code" (the query's code as a string of 0/1, one character per bit) and, when the
    `top_k` parameter is above 0, "ids" (the nearest database items, nearest first),
    "distances" (their Hamming distances) and "texts" (their texts).
    """

    def load_context(self, context):
        from dudch import retrieval

        self.retriever = retrieval.load(context.artifacts["retriever"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        frame = pd.DataFrame(model_input)
        columns = [c for c in QUERY_COLUMNS if c in frame.columns]
        if len(columns) != 1:
            raise DudchError(f"give the queries in exactly one column of {', '.join(QUERY_COLUMNS)}; "
                             f"got {list(frame.columns)}")
        (column,) = columns
        values = frame[column].tolist()
        if column == "text":
            codes = self.retriever.encode(texts=[str(v) for v in values])
        elif column == "image":
            codes = self.retriever.encode(images=values)
        else:
            codes = self.retriever.encode(**{column: np.stack([np.asarray(v, dtype=np.float32) for v in values])})
        out = pd.DataFrame({"code": ["".join("1" if b > 0 else "0" for b in c) for c in codes]})
        top_k = int((params or {}).get("top_k", 0))
        if top_k > 0:
            distances, rows = self.retriever.search(codes, top_k)
            out["ids"] = [self.retriever.item_id[r].tolist() for r in rows]
            out["distances"] = [d.astype(int).tolist() for d in distances]
            out["texts"] = [self.retriever.text[r].tolist() for r in rows]
        else:
            distances = [[]] * len(codes)
        texts = values if column == "text" else [None] * len(codes)
        out["warning"] = [self.retriever.warnings(c, d, t) for c, d, t in zip(codes, distances, texts)]
        return out


mlflow.models.set_model(RetrievalModel())
