"""`iak-dist plan` on a billion-row config, and the sharding errors of bad configs."""

import pytest

from iak_dist.cli import main

SCALE = ["plan", "configs/scale_1b.yaml", "--schema", "configs/schemas/scale_1b.yaml"]


def test_billion_row_plan_for_64_gpus_without_allocating(capsys):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main([*SCALE, "--world-size", "64", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "1,250,100,168 rows" in out and "over 64 x cuda" in out
    assert "t_user_id        600,000,000" in out and "row_wise" in out
    assert "r63:" in out
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert grown_gib < 2  # 599 GiB of tables were planned, not allocated


def test_unknown_sharding_type_for_the_device_lists_the_supported_ones(capsys):
    plan = "distributed.sharding.plan={user_id: {sharding_type: row_wise}}"
    code = main([*SCALE, "--world-size", "2", "--set", plan])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("error: distributed.sharding.plan.user_id: sharding type 'row_wise' is not supported on cpu; "
                   "this device supports data_parallel, table_wise, column_wise, table_column_wise")


def test_plan_for_an_unknown_feature_is_named(capsys):
    plan = "distributed.sharding.plan={usr: {sharding_type: table_wise}}"
    code = main([*SCALE, "--world-size", "2", "--set", plan])
    assert code == 2
    err = capsys.readouterr().err
    assert "distributed.sharding.plan.usr: no such sparse feature; features: user_id, item_id" in err


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plan_that_does_not_fit_memory_is_a_clear_error(device, capsys):
    budget = "distributed.sharding.memory_budget_gb=1"
    code = main([*SCALE, "--world-size", "2", "--device", device, "--set", budget])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: no plan fits 2 x {device} (distributed.sharding):")
