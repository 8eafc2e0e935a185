#!/bin/sh
# Entry point of the tpr-mlflow image: MLflow tracking server + model registry with
#   PostgreSQL backend store, S3 artifact store proxied by the server, basic-auth app.
# Configured only through environment variables (see cluster/mlflow/.env.example).
set -eu

need() {
  eval "v=\${$1:-}"
  [ -n "$v" ] || { echo "start-server: $1 is not set (see cluster/mlflow/.env.example)" >&2; exit 2; }
}
for var in POSTGRES_USER POSTGRES_PASSWORD POSTGRES_DB MLFLOW_AUTH_DB MLFLOW_DB_HOST \
           MLFLOW_ARTIFACTS_DESTINATION MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD \
           MLFLOW_FLASK_SERVER_SECRET_KEY; do
  need "$var"
done

# The password goes into URLs: percent-encode it.
pw=$(python -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["POSTGRES_PASSWORD"], safe=""))')
db="postgresql://${POSTGRES_USER}:${pw}@${MLFLOW_DB_HOST}:${MLFLOW_DB_PORT:-5432}"

# The basic-auth app reads its user store location from an ini file; write one with the auth
# database (its own database: its migrations must not share alembic's table with the tracking
# store). configparser treats % as interpolation, hence %%. The admin user comes from
# MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD on the first start.
auth_ini=$(mktemp /tmp/basic_auth.XXXXXX.ini)
auth_uri=$(printf '%s/%s' "$db" "$MLFLOW_AUTH_DB" | sed 's/%/%%/g')
cat > "$auth_ini" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${auth_uri}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
export MLFLOW_AUTH_CONFIG_PATH="$auth_ini"

# --serve-artifacts: clients log to mlflow-artifacts:/ and the server writes to S3 with its own
# credentials, so jobs need only the tracking URI, user and password.
exec mlflow server \
  --backend-store-uri "${db}/${POSTGRES_DB}" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --app-name basic-auth \
  --host 0.0.0.0 \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}"
