"""The Serve config as it must run on KubeRay: proxies on every pod, listening on all interfaces."""

from __future__ import annotations

from deployments.config import AppConfig, ConfigError, Listeners, parse_app_config, serve_listeners

APP_IMPORT_PATH = "deployments.app:build_app"


def cluster_serve_config(serve_config: dict, source: str = "config") -> tuple[dict, AppConfig, Listeners]:
    """The Serve config as it must run on KubeRay, its AppConfig, and where its proxies listen.

    Proxies run on every node (a worker pod's readiness probe asks the app's /health through the
    local proxy) and listen on 0.0.0.0 so the Kubernetes Services reach them. Everything else
    is carried over; ``args`` keeps the fields the file sets, normalized by AppConfig.
    """
    if "applications" not in serve_config:  # a bare AppConfig mapping, as load_serve_file accepts
        app = {"name": "shardserve", "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": serve_config}
        serve_config = {"applications": [app]}
    apps = serve_config["applications"]
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise ConfigError(f"{source}: applications must hold exactly one application (shardserve)")
    app = apps[0]
    if app.get("import_path") != APP_IMPORT_PATH:
        got = app.get("import_path")
        raise ConfigError(f"{source}: applications[0].import_path must be {APP_IMPORT_PATH!r}, got {got!r}")
    given = app.get("args") or {}
    config = parse_app_config(given, f"{source}: applications[0].args")
    # Only what the file sets (nested blocks too), so new AppConfig fields do not change manifests.
    args = config.model_dump(mode="json", include=set(given), exclude_unset=True)

    out: dict = {
        "proxy_location": "EveryNode",
        "http_options": {**(serve_config.get("http_options") or {}), "host": "0.0.0.0"},
    }
    for key, value in serve_config.items():
        if key not in ("proxy_location", "http_options", "applications"):
            out[key] = value
    out["applications"] = [{**app, "args": args}]
    return out, config, serve_listeners(out, source)
