//! PostgreSQL access shared by `load-batch` and `export_to_parquet`: configuration from the
//! environment, connecting (creating the database if it is missing), identifier quoting and the
//! transient/permanent classification of database errors.

use std::str::FromStr;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, Config, NoTls};

use crate::error::{Result, ToolError};

/// Environment variable holding the database URL.
pub const DATABASE_URL_ENV: &str = "DATAWARP_DATABASE_URL";
/// Environment variable holding the schema the tables live in.
pub const SCHEMA_ENV: &str = "DATAWARP_SCHEMA";
/// Database URL used when [`DATABASE_URL_ENV`] is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/datawarp";
/// Schema used when [`SCHEMA_ENV`] is unset.
pub const DEFAULT_SCHEMA: &str = "staging";
/// Connect timeout applied when the URL does not set one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the tables are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbConfig {
    /// libpq-style URL of the database.
    pub url: String,
    /// Schema holding one table per dataset.
    pub schema: String,
}

impl DbConfig {
    /// Reads the configuration from the environment, falling back to the defaults.
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        Self {
            url: var(DATABASE_URL_ENV, DEFAULT_DATABASE_URL),
            schema: var(SCHEMA_ENV, DEFAULT_SCHEMA),
        }
    }

    /// `schema.table` with both parts quoted.
    pub fn qualified(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(table))
    }

    fn parsed(&self) -> Result<Config> {
        let mut config = Config::from_str(&self.url).map_err(|e| {
            ToolError::permanent(format!(
                "`{DATABASE_URL_ENV}` is not a valid postgres url: {e}; expected postgres://user@host:port/database"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        Ok(config)
    }
}

/// Connects to the configured database, which must exist.
pub fn connect(db: &DbConfig) -> Result<Client> {
    let config = db.parsed()?;
    config.connect(NoTls).map_err(|e| {
        classify(
            e,
            &format!("cannot connect to database `{}`", dbname(&config)),
        )
    })
}

/// Connects to the configured database, creating it first if it does not exist. Returns the
/// client and whether the database was created by this call.
pub fn connect_or_create(db: &DbConfig) -> Result<(Client, bool)> {
    let config = db.parsed()?;
    let name = dbname(&config);
    match config.connect(NoTls) {
        Ok(client) => return Ok((client, false)),
        Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(classify(e, &format!("cannot connect to database `{name}`"))),
    }
    let mut admin_config = config.clone();
    admin_config.dbname("postgres");
    let mut admin = admin_config.connect(NoTls).map_err(|e| {
        classify(
            e,
            "cannot connect to database `postgres` to create the target database",
        )
    })?;
    let created = match admin.batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name))) {
        Ok(()) => true,
        // Another load-batch created it first; pg_database's unique index can also report it.
        Err(e) if matches!(e.code(), Some(c) if *c == SqlState::DUPLICATE_DATABASE || *c == SqlState::UNIQUE_VIOLATION) => {
            false
        }
        Err(e) => return Err(classify(e, &format!("cannot create database `{name}`"))),
    };
    let client = config
        .connect(NoTls)
        .map_err(|e| classify(e, &format!("cannot connect to database `{name}`")))?;
    Ok((client, created))
}

fn dbname(config: &Config) -> String {
    config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres")
        .to_string()
}

/// Quotes an identifier for SQL: wrapped in double quotes, inner double quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Classifies a database error: unreachable server, dropped connection, server starting or
/// shutting down, too many connections, serialization failure and deadlock are transient;
/// everything else (bad SQL, bad data, authentication) is permanent.
pub fn classify(error: postgres::Error, context: &str) -> ToolError {
    let transient = match error.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08")
                || matches!(
                    code,
                    "53300" | "57P01" | "57P02" | "57P03" | "40001" | "40P01"
                )
        }
        None => error.is_closed() || has_io_source(&error),
    };
    let message = describe(&error);
    if transient {
        ToolError::transient(format!("{context}: {message}"))
    } else {
        ToolError::permanent(format!("{context}: {message}"))
    }
}

fn has_io_source(error: &postgres::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        if inner.is::<std::io::Error>() {
            return true;
        }
        source = inner.source();
    }
    false
}

/// One-line description of a database error, with the server's context (such as the COPY line)
/// when it gives one.
pub fn describe(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(place) = db.where_() {
                text.push_str(&format!("; at {place}"));
            }
            text
        }
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(inner) = source {
                text.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_safely() {
        assert_eq!(quote_ident("ae"), "\"ae\"");
        assert_eq!(
            quote_ident("a\"; drop table x; --"),
            "\"a\"\"; drop table x; --\""
        );
        let db = DbConfig {
            url: DEFAULT_DATABASE_URL.into(),
            schema: "my schema".into(),
        };
        assert_eq!(db.qualified("t"), "\"my schema\".\"t\"");
    }

    #[test]
    fn an_unreachable_server_is_transient() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let db = DbConfig {
            url: format!("postgres://postgres@127.0.0.1:{port}/x"),
            schema: "s".into(),
        };
        let Err(error) = connect(&db) else {
            panic!("connected to a closed port")
        };
        assert_eq!(error.exit_code(), 75, "{}", error.log_line());
    }

    #[test]
    fn a_malformed_url_is_permanent() {
        let db = DbConfig {
            url: "postgres://a@b:notaport/x".into(),
            schema: "s".into(),
        };
        let Err(error) = connect(&db) else {
            panic!("connected with a malformed url")
        };
        assert_eq!(error.exit_code(), 1);
    }
}
