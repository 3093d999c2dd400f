"""The decode-step floor's accounting: packing a model's matmuls leaves the bytes a step reads unchanged."""

import json

import pytest
import torch

from benchmarks.floors import linear_rate, weight_footprint
from flover_backend.execution.layers.linear import can_pack
from flover_backend.execution.models.builtin import builtin_checkpoint, export_builtin
from flover_backend.execution.models.loader import load_model

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("tied", [False, True])
def test_packed_model_reads_the_bytes_it_read_before_packing(tmp_path, tied):
    path = builtin_checkpoint("tiny")
    if tied:  # the same shape with the LM head tied to the embedding, as builtin:small has it
        path = export_builtin("tiny", tmp_path / "tied")
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    model = load_model(path, torch.float32, "cpu")
    before = weight_footprint(model)
    model.prepack(4)
    assert weight_footprint(model) == before
    assert linear_rate(model, rows=2, repeats=1) > 0
