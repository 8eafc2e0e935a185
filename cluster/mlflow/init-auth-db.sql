-- Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d):
-- the basic-auth user store lives in its own database next to the tracking store.
CREATE DATABASE mlflow_auth;
