"""OpenAI-shaped error bodies, in the user's language, that LibreChat shows in the chat."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class GateError:
    status: int
    type: str
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "code": self.code}},
            ensure_ascii=False,
        ).encode()


def _fmt(n: int, language: str) -> str:
    text = f"{n:,}"
    return text.replace(",", ".") if language == "pt-BR" else text


MESSAGES: dict[str, dict[str, str]] = {
    "pt-BR": {
        "invalid_token": "Não foi possível identificar o usuário ({detail}). "
                         "Faça login novamente ou contate o administrador.",
        "quota_exceeded": "Seu saldo de tokens acabou: restam {available} tokens e esta "
                          "mensagem precisa de cerca de {estimate}. O saldo renova em {cycle_end}.",
        "quota_exceeded_buy": " Compre mais créditos em {url}.",
        "quota_exceeded_admin": " Fale com o administrador para liberar mais créditos.",
        "account_suspended": "Sua conta está suspensa e não pode usar o assistente. "
                             "Fale com o administrador.",
        "rate_limit_exceeded": "Muitas requisições: o limite é de {limit} por minuto. "
                               "Tente novamente em {retry} segundos.",
        "ledger_unavailable": "O controle de saldo está temporariamente indisponível. "
                              "Tente novamente em instantes.",
        "invalid_request": "Requisição inválida: {detail}.",
        "body_too_large": "A conversa é grande demais para ser enviada ({size} bytes; "
                          "limite {limit}). Inicie uma nova conversa.",
        "not_found": "Rota não disponível neste gateway.",
        "user_mismatch": "O campo 'user' não corresponde ao usuário autenticado.",
        "internal_error": "Erro interno no controle de tokens. Nada foi cobrado por esta "
                          "mensagem; tente novamente em instantes.",
    },
    "en": {
        "invalid_token": "Could not identify the user ({detail}). "
                         "Sign in again or contact the administrator.",
        "quota_exceeded": "Your token balance is used up: {available} tokens left and this "
                          "message needs about {estimate}. Your balance renews on {cycle_end}.",
        "quota_exceeded_buy": " Buy more credits at {url}.",
        "quota_exceeded_admin": " Ask the administrator for more credits.",
        "account_suspended": "Your account is suspended and cannot use the assistant. "
                             "Contact the administrator.",
        "rate_limit_exceeded": "Too many requests: the limit is {limit} per minute. "
                               "Try again in {retry} seconds.",
        "ledger_unavailable": "The balance service is temporarily unavailable. "
                              "Try again in a moment.",
        "invalid_request": "Invalid request: {detail}.",
        "body_too_large": "The conversation is too large to send ({size} bytes; limit "
                          "{limit}). Start a new conversation.",
        "not_found": "This route is not available on this gateway.",
        "user_mismatch": "The 'user' field does not match the authenticated user.",
        "internal_error": "Internal error in the token gate. Nothing was charged for this "
                          "message; try again in a moment.",
    },
}


# Why a request was refused before reaching the upstream (400 invalid_request): the codes
# of ``estimate.Refusal`` and the processor's body checks, with the offending field.
REFUSALS: dict[str, dict[str, str]] = {
    "pt-BR": {
        "not_utf8": "o corpo não é UTF-8 válido",
        "too_deep": "JSON aninhado demais",
        "not_json": "o corpo não é JSON válido",
        "not_object": "o corpo deve ser um objeto JSON",
        "empty_body": "corpo vazio",
        "method_not_allowed": "o método {detail} não é aceito nesta rota",
        "model_required": "o campo 'model' é obrigatório",
        "model_list": "uma lista de modelos ('{detail}') dispara várias chamadas e não é "
                      "aceita; escolha um modelo",
        "model_not_allowed": "o modelo '{detail}' não está liberado neste gateway",
        "fan_out": "o campo '{detail}' muda como o proxy chama o modelo (outros modelos, "
                   "credenciais, repetições ou parâmetros do provedor) e não é aceito",
        "service_tier": "o nível de serviço '{detail}' não é aceito neste gateway",
        "query_not_allowed": "parâmetros na URL não são aceitos nesta rota",
        "unreadable": "não foi possível ler a requisição",
        "bad_integer": "o campo '{detail}' deve ser um inteiro dentro do limite permitido",
        "max_tokens_above": "o limite de tokens de resposta pedido passa de {detail}",
    },
    "en": {
        "not_utf8": "body is not valid UTF-8",
        "too_deep": "JSON nested too deeply",
        "not_json": "body is not valid JSON",
        "not_object": "body must be a JSON object",
        "empty_body": "empty body",
        "method_not_allowed": "{detail} is not supported on this route",
        "model_required": "'model' is required",
        "model_list": "a list of models ('{detail}') makes several calls and is not "
                      "accepted; choose one model",
        "model_not_allowed": "model '{detail}' is not enabled on this gateway",
        "fan_out": "'{detail}' changes how the proxy calls the model (other models, "
                   "credentials, retries or provider parameters) and is not accepted",
        "service_tier": "service tier '{detail}' is not accepted on this gateway",
        "query_not_allowed": "URL parameters are not accepted on this route",
        "unreadable": "the request could not be read",
        "bad_integer": "'{detail}' must be an integer within the allowed range",
        "max_tokens_above": "the requested completion limit is above {detail}",
    },
}


# Why an identity was refused (401): identity.IdentityError's texts, which stay English in
# logs; the user reads them in the gate's language. ``{what}`` is a header or claim name.
IDENTITY_DETAILS: dict[str, str] = {
    "missing token": "token ausente",
    "missing or invalid gateway key": "chave do gateway ausente ou inválida",
    "missing X-User-Id": "X-User-Id ausente",
    "token too large": "token grande demais",
    "malformed token": "token malformado",
    "unsupported token algorithm": "algoritmo de token não aceito",
    "token expired": "token expirado",
    "invalid token": "token inválido",
    "token has no user id": "o token não traz o id do usuário",
    "signing key unavailable": "chave de assinatura indisponível",
    "unknown signing key": "chave de assinatura desconhecida",
    "{what} is an unexpanded placeholder": "{what} é um marcador não substituído",
    "{what} is too long": "{what} é longo demais",
    "{what} contains control characters": "{what} contém caracteres de controle",
}


def translate_identity(detail: str, language: str) -> str:
    if language == "en":
        return detail
    if detail in IDENTITY_DETAILS:
        return IDENTITY_DETAILS[detail]
    for english, text in IDENTITY_DETAILS.items():
        suffix = english.removeprefix("{what}")
        if suffix != english and detail.endswith(suffix):
            return text.format(what=detail[: -len(suffix)])
    return detail


class Messages:
    """Builds the gate's errors in one language."""

    def __init__(self, language: str, purchase_url: str | None = None) -> None:
        self.language = language
        self.text = MESSAGES[language]
        self.purchase_url = purchase_url

    def unauthorized(self, detail: str) -> GateError:
        return GateError(401, "invalid_request_error", "invalid_token",
                         self.text["invalid_token"].format(
                             detail=translate_identity(detail, self.language)),
                         (("www-authenticate", "Bearer"),))

    def quota_exceeded(self, available: int, estimate: int, cycle_end: str) -> GateError:
        message = self.text["quota_exceeded"].format(
            available=_fmt(max(available, 0), self.language),
            estimate=_fmt(estimate, self.language), cycle_end=cycle_end)
        if self.purchase_url:
            message += self.text["quota_exceeded_buy"].format(url=self.purchase_url)
        else:
            message += self.text["quota_exceeded_admin"]
        return GateError(402, "insufficient_quota", "quota_exceeded", message)

    def suspended(self) -> GateError:
        return GateError(403, "permission_denied", "account_suspended",
                         self.text["account_suspended"])

    def rate_limited(self, limit: int, retry_after: int,
                     headers: tuple[tuple[str, str], ...] = ()) -> GateError:
        return GateError(429, "rate_limit_error", "rate_limit_exceeded",
                         self.text["rate_limit_exceeded"].format(limit=limit, retry=retry_after),
                         (("retry-after", str(retry_after)), *headers))

    def unavailable(self) -> GateError:
        return GateError(503, "api_error", "ledger_unavailable",
                         self.text["ledger_unavailable"], (("retry-after", "5"),))

    def refused(self, code: str, detail: str = "") -> GateError:
        """400 for a request refused before the upstream; ``code`` is a key of REFUSALS."""
        reason = REFUSALS[self.language][code].format(detail=detail)
        return GateError(400, "invalid_request_error", code,
                         self.text["invalid_request"].format(detail=reason))

    def internal(self) -> GateError:
        return GateError(500, "api_error", "internal_error", self.text["internal_error"])

    def too_large(self, size: int, limit: int) -> GateError:
        return GateError(413, "invalid_request_error", "request_too_large",
                         self.text["body_too_large"].format(size=size, limit=limit))

    def not_found(self) -> GateError:
        return GateError(404, "invalid_request_error", "not_found", self.text["not_found"])

    def user_mismatch(self) -> GateError:
        return GateError(401, "invalid_request_error", "invalid_token",
                         self.text["user_mismatch"])
