"""The alerting rules and the example scrape config pass promtool's checks and the rules' unit tests."""

from tests.support.prometheus import PROMETHEUS_DIR, promtool


def test_alert_rules_pass_promtool_check_and_unit_tests(tools):
    checked = promtool(tools, "check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool(tools, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = promtool(tools, "check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)
    assert config.returncode == 0, config.stdout + config.stderr
