"""AppConfig loads from YAML, names the bad field's path, and sits inside a valid Ray Serve config."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppConfig, ConfigError, load_app_config

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
        config.port = 1


def test_committed_local_yaml_is_a_valid_serve_config_and_app_config():
    path = "deployments/configs/local.yaml"
    with open(path) as f:
        serve_config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    config = load_app_config(path)
    assert config.model is None and config.num_replicas == 1
    # Serve's own listeners (for `serve run`) and shardserve's (for `shardserve serve`) agree.
    assert (serve_config.http_options.host, serve_config.http_options.port) == (config.host, config.port)
    assert serve_config.grpc_options.port == config.grpc_port
    from deployments.app import GRPC_SERVICER

    assert serve_config.grpc_options.grpc_servicer_functions == [GRPC_SERVICER]


def test_readme_config_reference_is_in_sync():
    from deployments.config import config_reference

    with open("README.md") as f:
        assert config_reference() in f.read()
