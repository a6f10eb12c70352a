# Production image: the official Airflow image plus this package's DAG, plugins and settings.
FROM apache/airflow:3.3.2-python3.11

# pip must run as the airflow user; re-pin Airflow so no requirement can move it.
USER airflow
COPY --chown=airflow:root requirements.txt constraints.txt /opt/sync/
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /opt/sync/requirements.txt \
        -c /opt/sync/constraints.txt

COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
COPY --chown=airflow:root include/ /opt/airflow/include/
ENV SYNC_CONFIG_PATH=/opt/airflow/include/sync_config.yaml
