"""The scoring service on a real Ray Serve instance, through a real HTTP client: the predictor's scores,
each bad request's status and one-line message, concurrent clients, a replica killed mid-load."""

import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

CLIENT_TIMEOUT_S = 30.0  # no request may take longer (the service's own bound is request_timeout_s=20)


@pytest.fixture(scope="module")
def artefact(tmp_path_factory, backbone_dir, synth_dir, small_cfg, ctx):
    """seed 0's backbone with its `iak` adapter, exported as an fp32 artefact."""
    from iak_dist.phases.finetune import finetune
    from iak_dist.serving.artefact import export_artefact

    run_dir = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(backbone_dir, run_dir / "seed0" / "backbone")
    finetune(synth_dir, run_dir / "seed0" / "backbone", "iak", small_cfg.finetune, 0,
             run_dir / "seed0" / "adapters" / "iak", ctx, show_progress=False)
    return export_artefact(run_dir, "iak", run_dir.parent / "artefact")


@pytest.fixture(scope="module")
def predictor(artefact):
    from iak_dist.serving.predictor import Predictor

    return Predictor.load(artefact, unknown_domain="refuse")


@pytest.fixture(scope="module")
def rows(synth_dir, predictor):
    """The test split's first 400 rows as request rows (every domain mixed), JSON types only."""
    import pyarrow.parquet as pq

    table = pq.read_table(synth_dir / "test.parquet", columns=predictor.request_columns()).slice(0, 400)
    return table.to_pylist()


@pytest.fixture(scope="module")
def service(artefact):
    from iak_dist.orchestration.ray_pipeline import _free_port
    from iak_dist.serving.service import serve

    handle = serve(artefact, port=_free_port(), replicas=2, replica_cpus=0.5, max_batch_size=256,
                   max_request_rows=256, batch_wait_timeout_s=0.01, request_timeout_s=20.0,
                   unknown_domain="refuse", blocking=False)
    yield handle
    handle.stop()


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/score", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=CLIENT_TIMEOUT_S) as response:
        return json.load(response)


def assert_scores_equal(answer: dict, expected: dict) -> None:
    """Bitwise: float32 scores go out as JSON numbers that read back as the same float32."""
    for key in ("p_ctr", "p_cvr", "p_ctcvr"):
        got = np.asarray(answer[key], dtype=np.float32)
        assert np.array_equal(got.view(np.uint32), expected[key].view(np.uint32)), key


def test_scores_equal_the_predictors_and_health_and_readiness_answer(service, predictor, rows):
    status, answer = post(service.url, {"rows": rows[:200]})
    assert status == 200
    assert_scores_equal(answer, predictor.score(rows[:200]))
    assert answer["unknown_domain_rows"] == 0
    assert post(service.url, {"rows": []}) == (200, {"p_ctr": [], "p_cvr": [], "p_ctcvr": [], "unknown_domain_rows": 0})
    assert get(service.url + "/healthz") == {"status": "alive"}
    ready = get(service.url + "/ready")
    assert ready["ready"] is True
    manifest = ready["manifest"]
    assert manifest["provenance"]["backbone_identity"] == predictor.manifest["provenance"]["backbone_identity"]
    assert manifest["strategy"] == "iak" and manifest["domains"] == predictor.domains
    wrong = (("/score", 405, "method: /score takes POST, not GET"),
             ("/nowhere", 404, "path: no endpoint /nowhere (POST /score, GET /healthz, GET /ready)"))
    for path, status, message in wrong:
        with pytest.raises(urllib.error.HTTPError) as error:
            get(service.url + path)
        assert (error.value.code, json.load(error.value)["error"]) == (status, message)


BAD_REQUESTS = [
    # (body, status, field, the message's start)
    (b'{"rows": [', 400, "body", "body: not valid JSON"),
    (b'[{"domain": "d0"}]', 400, "body", 'body: expected a JSON object {"rows": [{...}, ...]}'),
    (b'{"rows": 3}', 400, "rows", "rows: expected a list of row objects, got int"),
    ("drop:item_id", 400, "item_id", "row 1: missing column 'item_id'"),
    ("set:user_id=abc", 400, "user_id", "row 1: column 'user_id' must be an integer ID, got 'abc'"),
    ("set:tags=7", 400, "tags", "row 1: column 'tags' must be a list of integer IDs, got 7"),
    ("set:dense_0=x", 400, "dense_0", "row 1: column 'dense_0' must be a finite number, got 'x'"),
    ("set:domain=nowhere", 400, "domain", "row 1: unknown domain 'nowhere' in column 'domain' (known: d0, d1, d2)"),
    ("oversized", 413, "rows", "rows: 257 rows in one request, at most 256 (max_request_rows)"),
]


@pytest.mark.parametrize("body, status, field, message", BAD_REQUESTS, ids=[b[2] + str(b[1]) for b in BAD_REQUESTS])
def test_a_bad_request_is_a_4xx_naming_the_field_and_the_service_keeps_serving(service, predictor, rows, body,
                                                                              status, field, message):
    if body == "oversized":
        body = {"rows": rows[:257]}
    elif isinstance(body, str):
        bad = dict(rows[1])
        action, _, what = body.partition(":")
        if action == "drop":
            del bad[what]
        else:
            column, _, value = what.partition("=")
            bad[column] = int(value) if value.isdigit() else value
        body = {"rows": [rows[0], bad]}
    got_status, answer = post(service.url, body)
    assert (got_status, answer["field"]) == (status, field)
    assert answer["error"].startswith(message) and "\n" not in answer["error"], answer["error"]
    good_status, good = post(service.url, {"rows": rows[:3]})
    assert good_status == 200
    assert_scores_equal(good, predictor.score(rows[:3]))


def test_concurrent_clients_are_each_answered_with_their_own_rows_scores(service, predictor, rows):
    """8 threads x 6 requests of different sizes, coalesced by the batcher: each answer is its own rows'."""
    expected = predictor.score(rows)
    failures: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(6):
            lo = int(rng.integers(0, 350))
            n = int(rng.integers(1, 50))
            status, answer = post(service.url, {"rows": rows[lo:lo + n]})
            if status != 200:
                failures.append(f"{status}: {answer}")
                continue
            # coalesced with other requests, a row goes through GEMMs of another batch size, blocked
            # differently: measured up to 1 ulp (6e-8) from scoring its request alone, hence rtol 1e-6
            if not all(np.allclose(np.asarray(answer[k], np.float32), expected[k][lo:lo + n], rtol=1e-6, atol=0)
                       for k in ("p_ctr", "p_cvr", "p_ctcvr")):
                failures.append(f"rows {lo}:{lo + n}: other scores")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []


def replica_names() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::")}


def test_a_replica_killed_mid_load_is_replaced_and_no_request_hangs(service, predictor, rows):
    import ray

    expected = predictor.score(rows[:20])
    before = replica_names()
    assert len(before) == 2
    outcomes: list[tuple[int, float]] = []  # (status or -1 for a connection error, seconds)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                status, _ = post(service.url, {"rows": rows[:20]})
            except OSError:  # the connection itself failed: an answer too, not a hang
                status = -1
            outcomes.append((status, time.monotonic() - start))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (victim in replica_names() or len(replica_names()) < 2):
        time.sleep(0.5)
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=CLIENT_TIMEOUT_S + 5)
    assert not any(thread.is_alive() for thread in threads), "a request hangs"
    after = replica_names()
    assert victim not in after and len(after) == 2, after  # Serve's controller started a replacement
    assert all(seconds < CLIENT_TIMEOUT_S for _, seconds in outcomes)
    statuses = [status for status, _ in outcomes]
    assert statuses.count(200) >= len(statuses) // 2, statuses  # the other replica kept serving
    for _ in range(6):  # after recovery, every request is answered, by either replica
        status, answer = post(service.url, {"rows": rows[:20]})
        assert status == 200
        assert_scores_equal(answer, expected)


def test_config_and_a_folder_that_is_no_artefact_are_refused_in_one_line(tmp_path):
    from iak_dist.errors import UserError
    from iak_dist.serving.service import ServeConfig, serve

    assert ServeConfig(max_batch_size=64).max_request_rows == 64  # follows the batch size unless set
    with pytest.raises(UserError, match=r"^serve: max_request_rows \(65\) must be <= max_batch_size \(64\): one "
                                        r"request is never split across batches$"):
        ServeConfig(max_batch_size=64, max_request_rows=65)
    with pytest.raises(UserError, match="^serve: unknown_domain must be backbone or refuse, got 'drop'$"):
        ServeConfig(unknown_domain="drop")
    with pytest.raises(UserError, match=r"no manifest.json; not a serving artefact"):
        serve(tmp_path, port=1)


def test_a_damaged_artefact_is_refused_in_one_line_before_ray_starts(artefact, tmp_path):
    import ray

    from iak_dist.errors import UserError
    from iak_dist.serving.service import serve

    damaged = tmp_path / "artefact"
    shutil.copytree(artefact, damaged)
    data = bytearray((damaged / "dense.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "dense.safetensors").write_bytes(bytes(data))
    started = ray.is_initialized()
    with pytest.raises(UserError, match="dense.safetensors") as refused:
        serve(damaged, port=1, blocking=False)
    assert ray.is_initialized() == started
    assert "did not start" not in str(refused.value)  # the predictor's own line, not a replica's failure


def test_replicas_the_cluster_cannot_place_are_refused_not_awaited():
    from iak_dist.errors import UserError
    from iak_dist.serving.service import ServeConfig, check_resources

    check_resources(ServeConfig(replicas=2), {"CPU": 2.0})
    with pytest.raises(UserError, match=r"^serve: 2 replica\(s\) need 2 GPU, the Ray cluster has 4 CPU, 0 GPU; "
                                        r"lower --replicas or add nodes$"):
        check_resources(ServeConfig(replicas=2, device="cuda"), {"CPU": 4.0})


def test_a_second_service_in_a_process_running_ray_is_refused(service, artefact):
    """The module's service holds this process's Ray: a second embedded start would stop it."""
    from iak_dist.errors import UserError
    from iak_dist.serving.service import serve

    with pytest.raises(UserError, match="Ray is already running in this process"):
        serve(artefact, blocking=False)
    assert urllib.request.urlopen(f"{service.url}/healthz", timeout=10).status == 200  # still serving
