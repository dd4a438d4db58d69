"""The record schema: older records are read as current ones."""
import pytest

from ssmcompress import records


def current(**extra) -> dict:
    fields = dict(run_id="r", key="k", time="2026-12-01T00:00:00+0000", config={}, model="m", method="dense",
                  benchmark="b", protocol="exact", seed=0, pruner="none", timings={})
    return records.Record(**{**fields, **extra}).to_dict()


def test_a_schema_3_record_has_its_mamba_version_renamed():
    old = dict(current(model_info=dict(generation=2, d_model=128)), schema=3)
    upgraded = records.migrate(old)
    assert upgraded["schema"] == records.SCHEMA
    assert upgraded["model_info"] == dict(mamba_version=2, d_model=128)
    assert records.migrate(upgraded) == upgraded  # a current record stays as it is


def test_a_current_record_without_model_info_keeps_the_default():
    record = current()
    assert records.migrate(record) == record


def test_what_is_no_record_is_refused():
    with pytest.raises(records.RecordError, match="unknown schema 9"):
        records.migrate(dict(current(), schema=9))


def test_a_transformers_models_generation_is_read_without_cuda_graphs():
    section = dict(device="cuda:0", cuda_graphs=True, speedup=1.2)
    hf = records.migrate(current(model_info=dict(family="hf"), generation=section))
    assert hf["generation"] == dict(section, cuda_graphs=False)  # transformers' generate has none
    mamba = records.migrate(current(model_info=dict(family="mamba"), generation=section))
    assert mamba["generation"] == section
    assert records.migrate(current())["generation"] is None
