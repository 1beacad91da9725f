"""The BigQuery source block: project, dataset, credentials and endpoints; builds the clients."""

from __future__ import annotations

import json
from typing import Any

from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import BigQueryReadClient
from prefect.blocks.core import Block
from prefect_gcp.credentials import GcpCredentials
from pydantic import Field, SecretStr

from bq_refresh.settings import Settings


class BigQuerySource(Block):
    """Where the source data lives in BigQuery, and how to reach it.

    With ``api_endpoint``/``storage_endpoint`` set (the local emulator) and no key given, anonymous
    credentials are used; otherwise the credentials come from ``gcp_credentials``, ``credentials_json`` or the environment's
    default (GOOGLE_APPLICATION_CREDENTIALS).
    """

    _block_type_name = "bq-refresh BigQuery source"
    _logo_url = "https://cdn.sanity.io/images/3ugk85nk/production/10424e311932e31c477ac2b9ef3d53cefbaad708-250x250.png"  # type: ignore[assignment]

    project_id: str = Field(description="Project that owns the dataset and runs the jobs.", examples=["my-project"])
    dataset: str = Field(description="Default dataset of source tables.", examples=["dataclient_amzatlas_agency_85"])
    location: str | None = Field(default=None, description="Job location, e.g. US or EU.")
    api_endpoint: str | None = Field(default=None, description="REST endpoint override (emulator).", examples=["http://127.0.0.1:9050"])
    storage_endpoint: str | None = Field(default=None, description="Storage Read gRPC host:port override (emulator).", examples=["127.0.0.1:9060"])
    gcp_credentials: GcpCredentials | None = Field(default=None, description="prefect-gcp credentials block.")
    credentials_json: SecretStr | None = Field(default=None, description="Service-account key as JSON text.")
    storage_honours_offsets: bool | None = Field(
        default=None, description="Whether the Storage Read endpoint starts ReadRows at the requested offset, as"
        " BigQuery does (a stand-in may too); the local emulator restarts every call at row 0. Default: not when"
        " storage_endpoint is set.")
    timeout_s: float = Field(default=60.0, description="How long BigQuery is tried when it gives no answer, seconds"
                             " (BIGQUERY_TIMEOUT_SECONDS).")
    query_timeout_s: float = Field(default=21600.0, description="How long a query job of a query or view source may"
                                   " run before it is cancelled, seconds (BIGQUERY_QUERY_TIMEOUT_SECONDS).")
    query_results_readable: bool | None = Field(
        default=None, description="Whether the Storage Read API reads a query job's result table (BigQuery does;"
        " the local emulator does not: there a query's result is written into a table by DDL). Default: not on the"
        " emulator (storage_endpoint set).")

    @property
    def honours_read_offset(self) -> bool:
        """BigQuery starts ReadRows at the requested offset; the local emulator ignores it."""
        if self.storage_honours_offsets is not None:
            return self.storage_honours_offsets
        return self.storage_endpoint is None

    @property
    def time_travel(self) -> bool:
        """Queries may read a table as of a past time (FOR SYSTEM_TIME AS OF): BigQuery; not the local emulator."""
        return self.api_endpoint is None

    @property
    def reads_query_results(self) -> bool:
        """A query's result is read from the job's own result table (``job.destination``) by a read session."""
        return self.storage_endpoint is None if self.query_results_readable is None else self.query_results_readable

    @classmethod
    def from_settings(cls, settings: Settings) -> BigQuerySource:
        """Build the block from environment settings alone (no saved block)."""
        return cls(
            project_id=settings.bigquery_project_id,
            dataset=settings.bigquery_dataset,
            location=settings.bigquery_location,
            api_endpoint=settings.bigquery_api_endpoint,
            storage_endpoint=settings.bigquery_storage_endpoint,
            storage_honours_offsets=settings.bigquery_storage_honours_offsets,
            credentials_json=settings.google_credentials_json,
            timeout_s=settings.bigquery_timeout_s,
            query_timeout_s=settings.bigquery_query_timeout_s,
        )

    def _credentials(self) -> Credentials | None:
        if self.api_endpoint and self.gcp_credentials is None and self.credentials_json is None:
            return AnonymousCredentials()  # type: ignore[no-untyped-call]
        if self.gcp_credentials is not None:
            return self.gcp_credentials.get_credentials_from_service_account()  # type: ignore[no-any-return]
        if self.credentials_json is not None:
            from google.oauth2 import service_account

            info: dict[str, Any] = json.loads(self.credentials_json.get_secret_value())
            return service_account.Credentials.from_service_account_info(  # type: ignore[no-any-return,no-untyped-call]
                info, scopes=["https://www.googleapis.com/auth/cloud-platform"]
            )
        return None  # application default credentials

    def get_bigquery_client(self) -> bigquery.Client:
        """Return a REST client for jobs, tables and schemas."""
        options = ClientOptions(api_endpoint=self.api_endpoint) if self.api_endpoint else None
        return bigquery.Client(
            project=self.project_id,
            credentials=self._credentials(),
            location=self.location,
            client_options=options,
        )

    def get_read_client(self) -> BigQueryReadClient:
        """Return a Storage Read API client (gRPC)."""
        if self.storage_endpoint:
            import grpc
            from google.cloud.bigquery_storage_v1.services.big_query_read.transports import (
                BigQueryReadGrpcTransport,
            )

            channel = grpc.insecure_channel(
                self.storage_endpoint,
                options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)],
            )
            return BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))
        return BigQueryReadClient(credentials=self._credentials())

    def table_ref(self, name: str) -> str:
        """Qualify ``table`` or ``dataset.table`` to ``project.dataset.table``."""
        parts = name.split(".")
        if len(parts) == 3:
            return name
        if len(parts) == 2:
            return f"{self.project_id}.{name}"
        return f"{self.project_id}.{self.dataset}.{name}"
