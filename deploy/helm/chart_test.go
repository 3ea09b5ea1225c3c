// Package chart_test validates the Helm chart in deploy/helm/prozess
// without a cluster: helm lint, helm template (helm's own Go packages), and
// every rendered object decoded strictly into its Kubernetes API type, so a
// misspelt or misplaced field fails here rather than at kubectl apply. It
// lives in a package of its own so that helm's and Kubernetes' modules are
// compiled only for `go test ./deploy/...`.
package chart_test

import (
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/releaseutil"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

const chartDir = "prozess"

var participants = []string{"api", "inventory", "payment", "delivery", "status"}

// everything turns on every optional part of the chart: TLS, SASL, Redis
// AUTH, the database CA, the ServiceMonitor, and payment as a StatefulSet
// with static membership.
var everything = map[string]any{
	"database": map[string]any{"caSecret": "prozess-db-ca"},
	"kafka": map[string]any{
		"tls":  map[string]any{"enabled": true, "caSecret": "kafka-ca"},
		"sasl": map[string]any{"mechanism": "SCRAM-SHA-512", "username": "prozess", "existingSecret": "kafka-sasl", "existingSecretKey": "password"},
	},
	"redis": map[string]any{
		"username":       "prozess",
		"existingSecret": "redis-auth",
		"tls":            map[string]any{"enabled": true, "caSecret": "redis-ca"},
	},
	"participants":   map[string]any{"payment": map[string]any{"staticMembership": true}},
	"serviceMonitor": map[string]any{"enabled": true, "labels": map[string]any{"release": "kube-prometheus-stack"}},
	"prometheusRule": map[string]any{"enabled": true, "labels": map[string]any{"release": "kube-prometheus-stack"}},
	"env":            map[string]any{"PROZESS_SAGA_DEADLINE": "10m"},
}

// byValue gives every credential as a value: the chart keeps them in its
// own Secret.
var byValue = map[string]any{
	"database": map[string]any{"url": "postgres://prozess:db-secret@pg:5432/prozess?sslmode=verify-full"},
	"kafka":    map[string]any{"sasl": map[string]any{"mechanism": "SCRAM-SHA-512", "username": "prozess", "password": "kafka-secret"}},
	"redis":    map[string]any{"password": "redis-secret"},
}

// objects is what one rendering produced, decoded into API types.
type objects struct {
	deployments     map[string]*appsv1.Deployment // by component
	statefulSets    map[string]*appsv1.StatefulSet
	pods            map[string]corev1.PodTemplateSpec // of both, by component
	services        map[string]*corev1.Service        // by component
	pdbs            map[string]*policyv1.PodDisruptionBudget
	jobs            []*batchv1.Job
	serviceMonitors []*monitoringv1.ServiceMonitor
	secrets         []*corev1.Secret
	prometheusRules []*monitoringv1.PrometheusRule
}

// render runs helm template for vals and decodes every object strictly.
func render(t *testing.T, vals map[string]any) objects {
	t.Helper()
	chrt, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("loading the chart: %v", err)
	}
	rv, err := chartutil.ToRenderValues(chrt, vals, chartutil.ReleaseOptions{Name: "shop", Namespace: "orders", IsInstall: true}, chartutil.DefaultCapabilities)
	if err != nil {
		t.Fatalf("values: %v", err)
	}
	files, err := engine.Render(chrt, rv)
	if err != nil {
		t.Fatalf("rendering: %v", err)
	}
	objs := objects{deployments: map[string]*appsv1.Deployment{}, statefulSets: map[string]*appsv1.StatefulSet{}, pods: map[string]corev1.PodTemplateSpec{}, services: map[string]*corev1.Service{}, pdbs: map[string]*policyv1.PodDisruptionBudget{}}
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if strings.HasSuffix(name, "NOTES.txt") {
			continue
		}
		for _, doc := range releaseutil.SplitManifests(files[name]) {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			if err := objs.add(doc); err != nil {
				t.Errorf("%s: %v\n%s", name, err, doc)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return objs
}

// decodeStrict decodes one YAML document into obj, refusing unknown and
// duplicate fields.
func decodeStrict(doc string, obj any) error {
	return yaml.UnmarshalStrict([]byte(doc), obj)
}

func (o *objects) add(doc string) error {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
		return err
	}
	component := func(m metav1.ObjectMeta) string { return m.Labels["app.kubernetes.io/component"] }
	switch tm.APIVersion + " " + tm.Kind {
	case "apps/v1 Deployment":
		d := &appsv1.Deployment{}
		if err := decodeStrict(doc, d); err != nil {
			return err
		}
		o.deployments[component(d.ObjectMeta)] = d
		o.pods[component(d.ObjectMeta)] = d.Spec.Template
	case "apps/v1 StatefulSet":
		s := &appsv1.StatefulSet{}
		if err := decodeStrict(doc, s); err != nil {
			return err
		}
		o.statefulSets[component(s.ObjectMeta)] = s
		o.pods[component(s.ObjectMeta)] = s.Spec.Template
	case "v1 Service":
		s := &corev1.Service{}
		if err := decodeStrict(doc, s); err != nil {
			return err
		}
		o.services[component(s.ObjectMeta)] = s
	case "policy/v1 PodDisruptionBudget":
		p := &policyv1.PodDisruptionBudget{}
		if err := decodeStrict(doc, p); err != nil {
			return err
		}
		o.pdbs[component(p.ObjectMeta)] = p
	case "batch/v1 Job":
		j := &batchv1.Job{}
		if err := decodeStrict(doc, j); err != nil {
			return err
		}
		o.jobs = append(o.jobs, j)
	case "monitoring.coreos.com/v1 ServiceMonitor":
		s := &monitoringv1.ServiceMonitor{}
		if err := decodeStrict(doc, s); err != nil {
			return err
		}
		o.serviceMonitors = append(o.serviceMonitors, s)
	case "monitoring.coreos.com/v1 PrometheusRule":
		r := &monitoringv1.PrometheusRule{}
		if err := decodeStrict(doc, r); err != nil {
			return err
		}
		o.prometheusRules = append(o.prometheusRules, r)
	case "v1 Secret":
		s := &corev1.Secret{}
		if err := decodeStrict(doc, s); err != nil {
			return err
		}
		o.secrets = append(o.secrets, s)
	default:
		return fmt.Errorf("unexpected object %s %s: add its type to this test", tm.APIVersion, tm.Kind)
	}
	return nil
}

// The strict decoder is what catches a misspelt field: a Deployment with
// one fails to decode.
func TestStrictDecodingRefusesUnknownFields(t *testing.T) {
	good := "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: 1\n"
	if err := decodeStrict(good, &appsv1.Deployment{}); err != nil {
		t.Fatalf("a valid Deployment: %v", err)
	}
	for _, bad := range []string{
		"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replica: 1\n",
		"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  template:\n    spec:\n      containers: [{name: c, livenesProbe: {}}]\n",
		"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: 1\n  replicas: 2\n",
	} {
		if err := decodeStrict(bad, &appsv1.Deployment{}); err == nil {
			t.Errorf("decoded without error:\n%s", bad)
		}
	}
}

// helm lint finds nothing worse than INFO, with the default values and
// with every option on.
func TestChartLints(t *testing.T) {
	for name, vals := range map[string]map[string]any{"defaults": nil, "everything": everything, "byValue": byValue} {
		l := lint.All(chartDir, vals, "orders", false)
		for _, m := range l.Messages {
			if m.Severity > support.InfoSev {
				t.Errorf("%s: %s", name, m)
			}
		}
	}
}

// The default rendering: one Deployment per participant running `serve
// NAME` with its admin port on every interface and the probes on it, a PDB
// for each, the api's Service, the admin Service, and the migration hook.
func TestChartRendersTheDeployment(t *testing.T) {
	objs := render(t, nil)
	if got := slices.Sorted(maps.Keys(objs.deployments)); !slices.Equal(got, slices.Sorted(slices.Values(participants))) {
		t.Fatalf("Deployments for %v, want %v", got, participants)
	}
	if len(objs.statefulSets) != 0 {
		t.Errorf("StatefulSets without staticMembership")
	}
	for _, name := range participants {
		d := objs.deployments[name]
		pod := d.Spec.Template
		if !selects(d.Spec.Selector, pod.Labels) {
			t.Errorf("%s: its selector %v does not select its pods %v", name, d.Spec.Selector, pod.Labels)
		}
		if len(pod.Spec.Containers) != 1 {
			t.Fatalf("%s: %d containers", name, len(pod.Spec.Containers))
		}
		c := pod.Spec.Containers[0]
		args := strings.Join(c.Args, " ")
		if !strings.HasPrefix(args, "serve "+name+" ") || !strings.Contains(args, "--admin-addr 0.0.0.0:9464") || !strings.Contains(args, "--seed=false") {
			t.Errorf("%s: args %q", name, args)
		}
		if port := containerPort(c, "admin"); port != 9464 {
			t.Errorf("%s: admin port %d", name, port)
		}
		for probe, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
			want := "/livez"
			if probe == "readiness" {
				want = "/readyz"
			}
			if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != want || p.HTTPGet.Port.String() != "admin" {
				t.Errorf("%s: %s probe %+v, want GET %s on the admin port", name, probe, p, want)
			}
		}
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
			t.Errorf("%s: resources %+v", name, c.Resources)
		}
		if env := envOf(c); env["PROZESS_DATABASE_URL"].ValueFrom == nil || env["PROZESS_DATABASE_URL"].ValueFrom.SecretKeyRef == nil ||
			env["PROZESS_DATABASE_URL"].ValueFrom.SecretKeyRef.Name != "prozess-database" {
			t.Errorf("%s: PROZESS_DATABASE_URL is not from the database Secret: %+v", name, env["PROZESS_DATABASE_URL"])
		}
		if sc := c.SecurityContext; sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: root filesystem writable", name)
		}
		pdb := objs.pdbs[name]
		if pdb == nil || !selects(pdb.Spec.Selector, pod.Labels) {
			t.Errorf("%s: no PodDisruptionBudget selects its pods", name)
		}
		for other, od := range objs.deployments {
			if other != name && pdb != nil && selects(pdb.Spec.Selector, od.Spec.Template.Labels) {
				t.Errorf("%s's PodDisruptionBudget also selects %s's pods", name, other)
			}
		}
		if !selects(&metav1.LabelSelector{MatchLabels: objs.services["admin"].Spec.Selector}, pod.Labels) {
			t.Errorf("the admin Service does not select %s's pods", name)
		}
	}
	api := objs.deployments["api"].Spec.Template
	if containerPort(api.Spec.Containers[0], "http") != 8080 || !strings.Contains(strings.Join(api.Spec.Containers[0].Args, " "), "--http-addr 0.0.0.0:8080") {
		t.Errorf("api: no HTTP port 8080: %v", api.Spec.Containers[0].Args)
	}
	svc := objs.services["api"]
	if svc == nil || svc.Spec.Ports[0].TargetPort.String() != "http" {
		t.Fatalf("api Service: %+v", svc)
	}
	for name, d := range objs.deployments {
		if name != "api" && selects(&metav1.LabelSelector{MatchLabels: svc.Spec.Selector}, d.Spec.Template.Labels) {
			t.Errorf("the api Service selects %s's pods", name)
		}
	}

	if len(objs.jobs) != 1 {
		t.Fatalf("%d Jobs, want the migration", len(objs.jobs))
	}
	job := objs.jobs[0]
	if job.Annotations["helm.sh/hook"] != "pre-install,pre-upgrade" {
		t.Errorf("migration Job hook %q", job.Annotations["helm.sh/hook"])
	}
	c := job.Spec.Template.Spec.Containers[0]
	if !slices.Equal(c.Args, []string{"migrate"}) || job.Spec.Template.Spec.RestartPolicy != corev1.RestartPolicyNever {
		t.Errorf("migration Job runs %v (restart %s)", c.Args, job.Spec.Template.Spec.RestartPolicy)
	}
	if env := envOf(c); env["PROZESS_DB_STATEMENT_TIMEOUT"].Value != "0" || env["PROZESS_DATABASE_URL"].ValueFrom == nil {
		t.Errorf("migration Job env %+v", env)
	}
	if selects(&metav1.LabelSelector{MatchLabels: objs.services["admin"].Spec.Selector}, job.Spec.Template.Labels) {
		t.Errorf("the admin Service selects the migration pod")
	}
	if len(objs.serviceMonitors) != 0 || len(objs.prometheusRules) != 0 {
		t.Errorf("a ServiceMonitor or PrometheusRule without serviceMonitor.enabled or prometheusRule.enabled")
	}
	if len(objs.secrets) != 0 {
		t.Errorf("a Secret with no credential given as a value")
	}
}

// With every option on, the secrets are referenced and mounted where the
// *_FILE variables point, and the ServiceMonitor scrapes the admin Service.
func TestChartRendersEveryOption(t *testing.T) {
	objs := render(t, everything)
	if got := slices.Sorted(maps.Keys(objs.pods)); !slices.Equal(got, slices.Sorted(slices.Values(participants))) {
		t.Fatalf("workloads for %v, want %v", got, participants)
	}
	for _, name := range participants {
		pod := objs.pods[name].Spec
		c := pod.Containers[0]
		env := envOf(c)
		mounts := secretFiles(pod, c) // mount path -> Secret
		for variable, secret := range map[string]string{
			"PROZESS_KAFKA_SASL_PASSWORD_FILE": "kafka-sasl/password",
			"PROZESS_REDIS_PASSWORD_FILE":      "redis-auth/password",
			"PROZESS_KAFKA_TLS_CA_FILE":        "kafka-ca/ca.crt",
			"PROZESS_REDIS_TLS_CA_FILE":        "redis-ca/ca.crt",
		} {
			if path := env[variable].Value; path == "" || mounts[path] != secret {
				t.Errorf("%s: %s=%q, mounted from %q, want the Secret %s", name, variable, path, mounts[path], secret)
			}
		}
		if mounts["/etc/prozess/db-ca/ca.crt"] != "prozess-db-ca/ca.crt" {
			t.Errorf("%s: the database CA is not mounted: %v", name, mounts)
		}
		for variable, want := range map[string]string{"PROZESS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "PROZESS_KAFKA_SASL_USERNAME": "prozess",
			"PROZESS_KAFKA_TLS": "true", "PROZESS_REDIS_USERNAME": "prozess", "PROZESS_REDIS_TLS": "true", "PROZESS_SAGA_DEADLINE": "10m"} {
			if env[variable].Value != want {
				t.Errorf("%s: %s=%q, want %q", name, variable, env[variable].Value, want)
			}
		}
	}
	pay := objs.statefulSets["payment"]
	if pay == nil || objs.deployments["payment"] != nil || len(objs.statefulSets) != 1 {
		t.Fatalf("payment is not the one StatefulSet: %v", slices.Collect(maps.Keys(objs.statefulSets)))
	}
	if id := envOf(pay.Spec.Template.Spec.Containers[0])["PROZESS_INSTANCE_ID"]; id.ValueFrom == nil || id.ValueFrom.FieldRef == nil ||
		id.ValueFrom.FieldRef.FieldPath != "metadata.name" {
		t.Errorf("payment's --instance-id is not its pod name: %+v", id)
	}
	if pay.Spec.ServiceName != objs.services["admin"].Name || !selects(pay.Spec.Selector, pay.Spec.Template.Labels) ||
		!selects(objs.pdbs["payment"].Spec.Selector, pay.Spec.Template.Labels) {
		t.Errorf("payment's StatefulSet: service %q, selector %v, labels %v", pay.Spec.ServiceName, pay.Spec.Selector, pay.Spec.Template.Labels)
	}
	for name, d := range objs.deployments {
		if _, ok := envOf(d.Spec.Template.Spec.Containers[0])["PROZESS_INSTANCE_ID"]; ok {
			t.Errorf("%s, a Deployment, has an instance id", name)
		}
	}
	if len(objs.serviceMonitors) != 1 {
		t.Fatalf("%d ServiceMonitors", len(objs.serviceMonitors))
	}
	sm := objs.serviceMonitors[0]
	admin := objs.services["admin"]
	if !selects(&sm.Spec.Selector, admin.Labels) || sm.Spec.Endpoints[0].Port != "admin" || sm.Labels["release"] != "kube-prometheus-stack" {
		t.Errorf("the ServiceMonitor %+v does not scrape the admin Service %v", sm.Spec, admin.Labels)
	}
}

// Credentials given as values go into the chart's one Secret, a hook made
// before the migration Job (itself a hook, which runs before the release's
// other objects exist), and every pod and the Job read each credential from
// it: the database URL as PROZESS_DATABASE_URL, the passwords as the files
// the *_FILE variables name.
func TestChartKeepsCredentialsGivenAsValues(t *testing.T) {
	objs := render(t, byValue)
	if len(objs.secrets) != 1 {
		t.Fatalf("%d Secrets, want the chart's one", len(objs.secrets))
	}
	sec := objs.secrets[0]
	want := map[string]string{
		"database-url":        "postgres://prozess:db-secret@pg:5432/prozess?sslmode=verify-full",
		"kafka-sasl-password": "kafka-secret",
		"redis-password":      "redis-secret",
	}
	if !maps.Equal(sec.StringData, want) {
		t.Errorf("the Secret holds %v, want %v", sec.StringData, want)
	}
	if len(objs.jobs) != 1 {
		t.Fatalf("%d Jobs", len(objs.jobs))
	}
	job := objs.jobs[0]
	hooks := func(m metav1.ObjectMeta) []string { return strings.Split(m.Annotations["helm.sh/hook"], ",") }
	weight := func(m metav1.ObjectMeta) int {
		w, err := strconv.Atoi(m.Annotations["helm.sh/hook-weight"])
		if err != nil {
			t.Fatalf("%s: hook weight %q", m.Name, m.Annotations["helm.sh/hook-weight"])
		}
		return w
	}
	if !slices.Equal(hooks(sec.ObjectMeta), hooks(job.ObjectMeta)) || weight(sec.ObjectMeta) >= weight(job.ObjectMeta) {
		t.Errorf("the Secret (hooks %v, weight %d) is not made before the migration Job (hooks %v, weight %d)",
			hooks(sec.ObjectMeta), weight(sec.ObjectMeta), hooks(job.ObjectMeta), weight(job.ObjectMeta))
	}
	pods := map[string]corev1.PodSpec{"migrate": job.Spec.Template.Spec}
	for name, p := range objs.pods {
		pods[name] = p.Spec
	}
	for name, pod := range pods {
		c := pod.Containers[0]
		env := envOf(c)
		if ref := env["PROZESS_DATABASE_URL"].ValueFrom; ref == nil || ref.SecretKeyRef == nil ||
			ref.SecretKeyRef.Name != sec.Name || ref.SecretKeyRef.Key != "database-url" {
			t.Errorf("%s: PROZESS_DATABASE_URL %+v, want %s/database-url", name, env["PROZESS_DATABASE_URL"], sec.Name)
		}
		mounts := secretFiles(pod, c)
		for variable, key := range map[string]string{"PROZESS_KAFKA_SASL_PASSWORD_FILE": "kafka-sasl-password", "PROZESS_REDIS_PASSWORD_FILE": "redis-password"} {
			if path := env[variable].Value; path == "" || mounts[path] != sec.Name+"/"+key {
				t.Errorf("%s: %s=%q, mounted from %q, want %s/%s", name, variable, path, mounts[path], sec.Name, key)
			}
		}
	}
	// Given as existing Secrets instead, none is made and those are read.
	objs = render(t, everything)
	if len(objs.secrets) != 0 {
		t.Errorf("%d Secrets with every credential in an existing Secret", len(objs.secrets))
	}
}

// secretFiles maps each file a container mounts from a Secret to
// "secret/key".
func secretFiles(pod corev1.PodSpec, c corev1.Container) map[string]string {
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		for _, v := range pod.Volumes {
			if v.Name == m.Name && v.Secret != nil {
				for _, item := range v.Secret.Items {
					mounts[m.MountPath+"/"+item.Path] = v.Secret.SecretName + "/" + item.Key
				}
			}
		}
	}
	return mounts
}

// The PrometheusRule carries exactly the rules of
// deploy/prometheus/prozess-alerts.yml (the file promtool tests and the
// real-Prometheus test load), decoded strictly into the operator's types.
func TestChartPrometheusRuleIsTheAlertsFile(t *testing.T) {
	objs := render(t, everything)
	if len(objs.prometheusRules) != 1 {
		t.Fatalf("%d PrometheusRules", len(objs.prometheusRules))
	}
	pr := objs.prometheusRules[0]
	if pr.Labels["release"] != "kube-prometheus-stack" {
		t.Errorf("PrometheusRule labels %v", pr.Labels)
	}
	b, err := os.ReadFile("../prometheus/prozess-alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	var file monitoringv1.PrometheusRuleSpec
	if err := decodeStrict(string(b), &file); err != nil {
		t.Fatalf("prozess-alerts.yml as a PrometheusRule spec: %v", err)
	}
	if len(file.Groups) == 0 || len(file.Groups[0].Rules) < 5 {
		t.Fatalf("prozess-alerts.yml: %d groups", len(file.Groups))
	}
	if !reflect.DeepEqual(pr.Spec, file) {
		t.Errorf("the PrometheusRule's rules differ from prozess-alerts.yml:\n%+v\nwant\n%+v", pr.Spec, file)
	}
}

func selects(s *metav1.LabelSelector, l map[string]string) bool {
	sel, err := metav1.LabelSelectorAsSelector(s)
	return err == nil && !sel.Empty() && sel.Matches(labels.Set(l))
}

func containerPort(c corev1.Container, name string) int32 {
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort
		}
	}
	return 0
}

func envOf(c corev1.Container) map[string]corev1.EnvVar {
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	return env
}

// Every flag the chart passes and every PROZESS_ variable it sets names a
// real flag of the command the container runs (a misspelt variable would be
// ignored silently): checked against the help of a prozess built from this
// tree.
func TestChartNamesOnlyRealFlags(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "prozess")
	if out, err := exec.Command("go", "build", "-o", bin, "../..").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	flags := map[string][]string{} // command -> its flags, global ones included
	flagsOf := func(command string) []string {
		if f, ok := flags[command]; ok {
			return f
		}
		out, err := exec.Command(bin, command, "--help").CombinedOutput()
		if err != nil {
			t.Fatalf("prozess %s --help: %v\n%s", command, err, out)
		}
		for _, m := range regexp.MustCompile(`(?m)^\s+(?:-\w, )?--([a-z0-9-]+)`).FindAllStringSubmatch(string(out), -1) {
			flags[command] = append(flags[command], m[1])
		}
		return flags[command]
	}
	objs := render(t, everything)
	var pods []corev1.PodSpec
	for _, p := range objs.pods {
		pods = append(pods, p.Spec)
	}
	for _, j := range objs.jobs {
		pods = append(pods, j.Spec.Template.Spec)
	}
	for _, pod := range pods {
		c := pod.Containers[0]
		known := flagsOf(c.Args[0])
		for _, a := range c.Args {
			if name, ok := strings.CutPrefix(a, "--"); ok {
				name, _, _ = strings.Cut(name, "=")
				if !slices.Contains(known, name) {
					t.Errorf("prozess %s has no flag --%s", c.Args[0], name)
				}
			}
		}
		for _, e := range c.Env {
			if _, fromValues := everything["env"].(map[string]any)[e.Name]; fromValues {
				continue
			}
			name, ok := strings.CutPrefix(e.Name, "PROZESS_")
			if !ok {
				t.Errorf("%s sets %s", c.Args[0], e.Name)
				continue
			}
			if flag := strings.ToLower(strings.ReplaceAll(name, "_", "-")); !slices.Contains(known, flag) {
				t.Errorf("%s: %s names no flag of prozess %s (--%s)", pod.Containers[0].Name, e.Name, c.Args[0], flag)
			}
		}
	}
	if len(flags["serve"]) < 20 || len(flags["migrate"]) < 5 {
		t.Fatalf("read too few flags from --help: %v", flags)
	}
}

// values.schema.json refuses what the templates would ignore: a misspelt
// key, a variable that is no PROZESS_ flag, an unknown SASL mechanism.
func TestChartRefusesUnknownValues(t *testing.T) {
	chrt, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	opts := chartutil.ReleaseOptions{Name: "shop", Namespace: "orders", IsInstall: true}
	if _, err := chartutil.ToRenderValues(chrt, everything, opts, chartutil.DefaultCapabilities); err != nil {
		t.Fatalf("every option: %v", err)
	}
	for _, bad := range []map[string]any{
		{"database": map[string]any{"urlSecret": map[string]any{"name": "x"}}},
		{"redis": map[string]any{"passwordSecret": map[string]any{"name": "x"}}},
		{"prometheusRule": map[string]any{"enable": true}},
		{"participants": map[string]any{"payment": map[string]any{"replica": 3}}},
		{"env": map[string]any{"SAGA_DEADLINE": "10m"}},
		{"kafka": map[string]any{"sasl": map[string]any{"mechanism": "SCRAM-SHA-1"}}},
		{"serviceMonitor": map[string]any{"enable": true}},
	} {
		if _, err := chartutil.ToRenderValues(chrt, bad, opts, chartutil.DefaultCapabilities); err == nil {
			t.Errorf("values %v accepted", bad)
		}
	}
}
