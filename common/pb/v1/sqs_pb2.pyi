from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scheme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEME_UNSPECIFIED: _ClassVar[Scheme]
    SCHEME_TOPK: _ClassVar[Scheme]
    SCHEME_CONFORMAL: _ClassVar[Scheme]
    SCHEME_DENSE: _ClassVar[Scheme]
    SCHEME_TOKEN: _ClassVar[Scheme]
    SCHEME_FP16_TOPK: _ClassVar[Scheme]
    SCHEME_FP32: _ClassVar[Scheme]
    SCHEME_NONE: _ClassVar[Scheme]
    SCHEME_INVARIANT: _ClassVar[Scheme]
SCHEME_UNSPECIFIED: Scheme
SCHEME_TOPK: Scheme
SCHEME_CONFORMAL: Scheme
SCHEME_DENSE: Scheme
SCHEME_TOKEN: Scheme
SCHEME_FP16_TOPK: Scheme
SCHEME_FP32: Scheme
SCHEME_NONE: Scheme
SCHEME_INVARIANT: Scheme

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class SchemeParams(_message.Message):
    __slots__ = ("scheme", "k", "ell", "drop_zeros")
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    ELL_FIELD_NUMBER: _ClassVar[int]
    DROP_ZEROS_FIELD_NUMBER: _ClassVar[int]
    scheme: Scheme
    k: int
    ell: int
    drop_zeros: bool
    def __init__(self, scheme: _Optional[_Union[Scheme, str]] = ..., k: _Optional[int] = ..., ell: _Optional[int] = ..., drop_zeros: _Optional[bool] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("context_token_ids", "sampling", "scheme", "vocab_fingerprint", "vocab_size", "max_drafts", "client_session_id")
    CONTEXT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    context_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    scheme: SchemeParams
    vocab_fingerprint: str
    vocab_size: int
    max_drafts: int
    client_session_id: str
    def __init__(self, context_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., scheme: _Optional[_Union[SchemeParams, _Mapping]] = ..., vocab_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_drafts: _Optional[int] = ..., client_session_id: _Optional[str] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "target_model", "vocab_size", "eos_token_ids", "pass_rows", "pass_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PASS_ROWS_FIELD_NUMBER: _ClassVar[int]
    PASS_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    target_model: str
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    pass_rows: _containers.RepeatedScalarFieldContainer[int]
    pass_ms: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[str] = ..., target_model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., pass_rows: _Optional[_Iterable[int]] = ..., pass_ms: _Optional[_Iterable[float]] = ...) -> None: ...

class DraftBatch(_message.Message):
    __slots__ = ("session_id", "position", "num_drafts", "packed", "raw", "k", "ell", "plain_steps", "stream", "lookahead")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    ELL_FIELD_NUMBER: _ClassVar[int]
    PLAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    num_drafts: int
    packed: bytes
    raw: bytes
    k: int
    ell: int
    plain_steps: int
    stream: bool
    lookahead: bool
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., num_drafts: _Optional[int] = ..., packed: _Optional[bytes] = ..., raw: _Optional[bytes] = ..., k: _Optional[int] = ..., ell: _Optional[int] = ..., plain_steps: _Optional[int] = ..., stream: _Optional[bool] = ..., lookahead: _Optional[bool] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("accepted", "token", "position", "received_unix_us", "sent_unix_us", "forward_us", "plain_tokens", "more", "row_price_ms", "lookahead_drafted", "lookahead_accepted")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    FORWARD_US_FIELD_NUMBER: _ClassVar[int]
    PLAIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    ROW_PRICE_MS_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_DRAFTED_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    token: int
    position: int
    received_unix_us: int
    sent_unix_us: int
    forward_us: int
    plain_tokens: _containers.RepeatedScalarFieldContainer[int]
    more: bool
    row_price_ms: float
    lookahead_drafted: int
    lookahead_accepted: int
    def __init__(self, accepted: _Optional[int] = ..., token: _Optional[int] = ..., position: _Optional[int] = ..., received_unix_us: _Optional[int] = ..., sent_unix_us: _Optional[int] = ..., forward_us: _Optional[int] = ..., plain_tokens: _Optional[_Iterable[int]] = ..., more: _Optional[bool] = ..., row_price_ms: _Optional[float] = ..., lookahead_drafted: _Optional[int] = ..., lookahead_accepted: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
