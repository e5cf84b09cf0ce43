-- Run once by the postgres image, on an empty data directory: the basic-auth app's user store
-- (basic_auth.ini's database_uri), beside the tracking database POSTGRES_DB=mlflow.
CREATE DATABASE mlflow_auth;
