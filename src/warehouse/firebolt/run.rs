//! The statements of one operation (an apply, a describe, prepare): one session for all
//! of them (a transaction's `transaction_id` lives there), a `query_label` per statement
//! that ties it to the batch (`<batch>:<seq>:<kind>`), and the statement count the
//! benchmark reports.

use crate::config::Secret;

use super::client::{Client, Statement};
use super::error::FireboltError;
use super::protocol::{QueryResult, SessionState};

/// Session parameters that belong to one transaction (set by BEGIN's reply).
const TRANSACTION_PARAMS: [&str; 2] = ["transaction_id", "transaction_sequence_id"];

pub struct Runner<'a> {
    client: &'a Client,
    session: SessionState,
    label_prefix: String,
    seq: u32,
    /// Statements sent (each once, whatever the retries).
    pub statements: u32,
    /// Between a successful BEGIN and COMMIT: a failure must roll back.
    pub in_transaction: bool,
}

impl<'a> Runner<'a> {
    /// Resolves the session (authentication and engine discovery on first use).
    pub async fn new(
        client: &'a Client,
        label_prefix: impl Into<String>,
    ) -> Result<Self, FireboltError> {
        Ok(Self {
            session: client.session().await?,
            client,
            label_prefix: label_prefix.into(),
            seq: 0,
            statements: 0,
            in_transaction: false,
        })
    }

    /// Every statement of an operation stops on the server if the client gives up on it
    /// (`Statement::cancel_on_drop`): a retried batch never races its own first attempt.
    fn statement(&mut self, kind: &'static str, sql: String) -> Statement {
        self.seq += 1;
        Statement::new(
            kind,
            format!("{}:{:02}:{kind}", self.label_prefix, self.seq),
            sql,
        )
        .cancelled_on_drop()
    }

    pub async fn run(
        &mut self,
        kind: &'static str,
        sql: String,
    ) -> Result<QueryResult, FireboltError> {
        let statement = self.statement(kind, sql);
        self.send(statement).await
    }

    /// A statement that carries secrets: logs show `redacted`, errors mask `secrets`.
    pub async fn run_redacted(
        &mut self,
        kind: &'static str,
        sql: String,
        redacted: String,
        secrets: Vec<Secret>,
    ) -> Result<QueryResult, FireboltError> {
        let statement = secrets.into_iter().fold(
            self.statement(kind, sql).with_redacted(redacted),
            Statement::with_secret,
        );
        self.send(statement).await
    }

    async fn send(&mut self, statement: Statement) -> Result<QueryResult, FireboltError> {
        self.statements += 1;
        self.client.execute_in(&mut self.session, &statement).await
    }

    pub async fn begin(&mut self) -> Result<(), FireboltError> {
        self.run("begin", "BEGIN TRANSACTION".into()).await?;
        self.in_transaction = true;
        Ok(())
    }

    /// A failed (or unanswered) COMMIT is followed by a ROLLBACK, as the Go SDK does: it
    /// frees the server's transaction sooner, and if the COMMIT did land the ROLLBACK only
    /// errors (no transaction in progress). The outcome stays unknown to the caller: the
    /// ledger tells on the next delivery.
    pub async fn commit(&mut self) -> Result<(), FireboltError> {
        let result = self.run("commit", "COMMIT".into()).await.map(|_| ());
        if result.is_ok() {
            self.in_transaction = false;
            self.end_transaction();
        } else {
            self.rollback().await;
        }
        result
    }

    /// The server removes the transaction's parameters with Firebolt-Remove-Parameters;
    /// should a reply lack that header, later statements must not carry a finished
    /// transaction's id.
    fn end_transaction(&mut self) {
        for key in TRANSACTION_PARAMS {
            self.session.params.remove(key);
        }
    }

    /// Best effort, after a failure inside the transaction.
    pub async fn rollback(&mut self) {
        if !self.in_transaction {
            return;
        }
        self.in_transaction = false;
        if let Err(e) = self.run("rollback", "ROLLBACK".into()).await {
            tracing::warn!(error = %e, "Firebolt ROLLBACK failed; the server discards the open transaction");
        }
        self.end_transaction();
    }
}
