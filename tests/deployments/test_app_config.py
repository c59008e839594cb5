"""AppConfig loads from YAML, names the bad field's path, and sits inside a valid Ray Serve config."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppConfig, ConfigError, Listeners, load_app_config, load_serve_file

SERVE_YAML = """
applications:
  - name: shardserve
    route_prefix: /
    import_path: deployments.app:build_app
    args:
      served_model_name: smollm2
      tensor_parallel_size: "3"
      pipeline_parallel_size: 1
      autoscaling: {min_replicas: 1, max_replicas: 3}
      num_replicas: null
"""


def test_serve_config_file_loads_and_is_valid_for_ray_serve(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(SERVE_YAML)
    config = load_app_config(path)
    assert config.tensor_parallel_size == 3  # "3" in YAML arrives as an int, as Serve passes args
    assert config.autoscaling.max_replicas == 3
    ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML))
    engine = config.engine_config()
    assert engine.parallel.world_size == 3


@pytest.mark.parametrize(
    "args,where",
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"dtype": "float8"}, "dtype"),
        ({"max_batch": 4}, "max_batch"),
        ({"autoscaling": {"min_replicas": 1, "max_replicas": 2, "upscale": 1}, "num_replicas": None}, "autoscaling.upscale"),
        ({"num_replicas": 2, "autoscaling": {"min_replicas": 1}}, "num_replicas or autoscaling"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}, "num_replicas": None}, "min_replicas (3)"),
    ],
)
def test_bad_fields_fail_at_load_naming_the_path(tmp_path, args, where):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"import_path": "deployments.app:build_app", "args": args}]}))
    with pytest.raises(ConfigError) as err:
        load_app_config(path)
    assert where in str(err.value)
    assert "applications[0].args" in str(err.value)


def test_every_field_has_a_description():
    for model in (AppConfig, AppConfig.model_fields["autoscaling"].annotation.__args__[0]):
        missing = [name for name, f in model.model_fields.items() if not f.description]
        assert missing == []


def test_bare_mapping_and_frozen(tmp_path):
    path = tmp_path / "app.yaml"
    path.write_text("model: /models/llama\npipeline_parallel_size: 2\n")
    config = load_app_config(path)
    assert config.pipeline_parallel_size == 2 and config.num_replicas == 1
    with pytest.raises(Exception):
        config.max_num_seqs = 1


def test_committed_local_yaml_is_a_valid_serve_config_and_app_config():
    path = "deployments/configs/local.yaml"
    with open(path) as f:
        serve_config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    config, listeners = load_serve_file(path)
    assert config.model is None and config.num_replicas == 1
    # `shardserve serve --config` listens where `serve run` does: both read Serve's own options.
    assert (serve_config.http_options.host, serve_config.http_options.port) == (listeners.host, listeners.port)
    assert serve_config.grpc_options.port == listeners.grpc_port
    from deployments.app import GRPC_SERVICER

    assert serve_config.grpc_options.grpc_servicer_functions == [GRPC_SERVICER]


def test_readme_config_reference_is_in_sync():
    from deployments.config import config_reference

    with open("README.md") as f:
        assert config_reference() in f.read()


def test_listeners_come_from_serve_options_and_are_refused_in_args(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(SERVE_YAML)  # no http_options / grpc_options: what Serve itself defaults to
    assert load_serve_file(path)[1] == Listeners(host="0.0.0.0", port=8000, grpc_port=None)
    bare = tmp_path / "bare.yaml"
    bare.write_text("max_num_seqs: 4\n")
    assert load_serve_file(bare)[1] == Listeners()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"import_path": "deployments.app:build_app", "args": {"port": 1}}]}))
    with pytest.raises(ConfigError, match="args: port: .*http_options"):
        load_app_config(bad)


def test_engine_settings_are_declared_once_and_layer_split_is_settable(tmp_path):
    from cluster.config import EngineConfig

    assert set(EngineConfig.model_fields) < set(AppConfig.model_fields)
    path = tmp_path / "app.yaml"
    path.write_text("pipeline_parallel_size: 2\nlayer_split: [20, 10]\nblock_size: 8\n")
    engine = load_app_config(path).engine_config()
    assert type(engine) is EngineConfig
    assert engine.parallel.layer_ranges(30) == [(0, 20), (20, 30)] and engine.block_size == 8
    path.write_text("pipeline_parallel_size: 2\nlayer_split: [20, 5, 5]\n")
    with pytest.raises(ConfigError, match="layer_split has 3 entries but pipeline_parallel_size is 2"):
        load_app_config(path)


def test_api_key_file_is_read_and_refused_alongside_api_key(tmp_path):
    from deployments.config import AppConfig, ConfigError, read_api_key

    path = tmp_path / "api_key"
    path.write_text("sk-secret\n")  # a Secret file may end in a newline
    assert read_api_key(str(path)) == "sk-secret"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_api_key(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="api_key_file"):
        read_api_key(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not both"):
        AppConfig(api_key="a", api_key_file=str(path))


def test_a_hub_model_is_served_under_its_id():
    from deployments.app import served_name
    from deployments.config import AppConfig

    assert served_name(AppConfig(model="acme/tiny-llama@v2")) == "acme/tiny-llama"
    assert served_name(AppConfig(model="acme/tiny-llama", served_model_name="t")) == "t"
