"""KubeRay RayService manifests rendered from the app config, and the checks that say they will run.

``render`` turns a Serve config file (the AppConfig under ``applications[0].args``, the same
format as deployments/configs/local.yaml) into one RayService: ``serveConfigV2`` is that config
made cluster-ready (serve_config.py), the head pod runs no model (``num-cpus: "0"``), and one
worker group is sized so that the Serve replica range fits (render.py). ``check`` validates a
manifest the way the cluster will (checks.py): the CRD schema (crd_schema.py), the operator's own
rules, Ray Serve's schema, the AppConfig, and whether every replica's placement group fits the
worker pods (fit.py). The commands are ``shardserve k8s render|check`` (deployments/cli.py).
"""

from deployments.k8s.checks import check_file, check_manifest, operator_rule_errors
from deployments.k8s.fit import ResourceFitError, check_resource_fit, replica_units, serve_replica_range
from deployments.k8s.render import IMAGE_VERSION, RenderOptions, build_rayservice, render_file, render_rayservice

__all__ = [
    "IMAGE_VERSION", "RenderOptions", "ResourceFitError", "build_rayservice", "check_file", "check_manifest",
    "check_resource_fit", "operator_rule_errors", "render_file", "render_rayservice", "replica_units",
    "serve_replica_range",
]  # fmt: skip
