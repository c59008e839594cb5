"""The gRPC API (deployments/proto/shardserve.proto) in terms of the HTTP one: a request becomes the
JSON body of the matching OpenAI route, so both are validated alike; deltas become messages."""

from __future__ import annotations

import json

import grpc

from cluster.protocol import RequestOutput
from deployments.openai_protocol import ChatCompletionRequest, CompletionRequest, logprobs_of, usage
from deployments.proto import shardserve_pb2 as pb
from deployments.protocol import RequestError

GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_request_body(request: pb.GenerateRequest, model_name: str) -> tuple[dict, type]:
    """The gRPC request as the JSON body of the matching HTTP route, so both are validated alike."""
    if bool(request.prompt) == bool(request.messages):
        raise RequestError.invalid("set exactly one of prompt and messages")
    body: dict = {"model": request.model or model_name, "top_k": request.top_k, "ignore_eos": request.ignore_eos}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if request.HasField(name):
            body[name] = getattr(request, name)
    if request.stop:
        body["stop"] = list(request.stop)
    if request.response_format:
        try:
            body["response_format"] = json.loads(request.response_format)
        except json.JSONDecodeError as e:
            raise RequestError.invalid(f"response_format is not valid JSON: {e}", param="response_format") from None
    if request.messages:
        body["messages"] = grpc_prompt(request)
        if request.HasField("logprobs"):
            body.update(logprobs=True, top_logprobs=request.logprobs)
        return body, ChatCompletionRequest
    body["prompt"] = request.prompt
    if request.HasField("logprobs"):
        body["logprobs"] = request.logprobs
    return body, CompletionRequest


def set_grpc_error(grpc_context, e: RequestError) -> None:
    """The refusal or failure as the call's gRPC status and details."""
    grpc_context.set_code(GRPC_STATUS[e.status])
    grpc_context.set_details(e.message)


def grpc_authorization(grpc_context) -> str | None:
    """The request's `authorization` metadata."""
    return dict(grpc_context.invocation_metadata()).get("authorization")


def grpc_prompt(request: pb.GenerateRequest) -> str | list[dict]:
    """The prompt a request router looks at: the text, or the messages."""
    return request.prompt or [{"role": m.role, "content": m.content} for m in request.messages]


def grpc_response(items: list[RequestOutput], rid: str, model: str) -> pb.GenerateResponse:
    """One message for a run of deltas: the whole completion (unary) or one delta (streaming)."""
    last = items[-1]
    out = pb.GenerateResponse(
        id=rid,
        model=model,
        text="".join(i.text for i in items),
        token_ids=[t for i in items for t in i.token_ids],
        finish_reason=last.finish_reason or "",
    )
    if last.finish_reason:
        u = usage(last)
        out.usage.CopyFrom(pb.Usage(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                                    total_tokens=u["total_tokens"], cached_tokens=u["prompt_tokens_details"]["cached_tokens"]))
    for lp in logprobs_of(items):
        top = [pb.TopLogprob(token=t, logprob=v) for t, v in lp.top]
        out.logprobs.append(pb.TokenLogprob(token=lp.token, token_id=lp.token_id, logprob=lp.logprob, top_logprobs=top))
    return out
