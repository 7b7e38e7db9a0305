package rules

import (
	"errors"
	"net/http"
	"strings"
	"testing"
)

func TestMatch(t *testing.T) {
	json := http.Header{"Content-Type": {"application/json"}, "X-Team": {"blue", "red"}}
	tests := []struct {
		name   string
		spec   Spec
		method string
		url    string
		h      http.Header
		want   bool
	}{
		{"empty spec matches anything", Spec{}, "DELETE", "http://x/y", nil, true},
		{"empty spec matches empty request", Spec{}, "", "", nil, true},
		{"method matches", Spec{Method: "^GET$"}, "GET", "http://a/", nil, true},
		{"method differs", Spec{Method: "^GET$"}, "POST", "http://a/", nil, false},
		{"method unanchored", Spec{Method: "GE"}, "GET", "http://a/", nil, true},
		{"method alternation", Spec{Method: "^(GET|HEAD)$"}, "HEAD", "", nil, true},
		{"url unanchored", Spec{URL: `api\.internal`}, "GET", "http://api.internal/v1", nil, true},
		{"url anchored differs", Spec{URL: `^https://`}, "GET", "http://api.internal/v1", nil, false},
		{"url connect host:port", Spec{URL: `^db\.internal:5432$`}, "CONNECT", "db.internal:5432", nil, true},
		{"method and url both needed", Spec{Method: "^GET$", URL: "internal"}, "POST", "http://internal/", nil, false},
		{"header matches", Spec{Headers: map[string]string{"Content-Type": "json"}}, "GET", "", json, true},
		{"header name not canonical in spec", Spec{Headers: map[string]string{"content-type": "^application/"}}, "GET", "", json, true},
		{"header value differs", Spec{Headers: map[string]string{"Content-Type": "xml"}}, "GET", "", json, false},
		{"header first value only", Spec{Headers: map[string]string{"X-Team": "red"}}, "GET", "", json, false},
		{"absent header matched as empty", Spec{Headers: map[string]string{"X-Missing": "^$"}}, "GET", "", json, true},
		{"absent header fails non-empty", Spec{Headers: map[string]string{"X-Missing": "."}}, "GET", "", json, false},
		{"nil header map", Spec{Headers: map[string]string{"X-Missing": "."}}, "GET", "", nil, false},
		{"empty header regex matches anything", Spec{Headers: map[string]string{"X-Missing": ""}}, "GET", "", nil, true},
		{"all headers must match", Spec{Headers: map[string]string{"Content-Type": "json", "X-Team": "green"}}, "GET", "", json, false},
		{"all fields match", Spec{Method: "GET", URL: "a", Headers: map[string]string{"X-Team": "blue"}}, "GET", "http://a/", json, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := Compile(tt.spec)
			if err != nil {
				t.Fatalf("Compile: %v", err)
			}
			if got := r.Match(tt.method, tt.url, tt.h); got != tt.want {
				t.Errorf("Match(%q, %q, %v) = %v, want %v", tt.method, tt.url, tt.h, got, tt.want)
			}
		})
	}
}

func TestZeroRuleMatches(t *testing.T) {
	var r Rule
	if !r.Match("GET", "http://x/", nil) {
		t.Error("zero Rule does not match")
	}
}

func TestCompileErrors(t *testing.T) {
	tests := []struct {
		name  string
		spec  Spec
		field string
		want  string
	}{
		{"url", Spec{URL: "("}, "url", `url: invalid regular expression "(": missing closing )`},
		{"method", Spec{Method: "[a-"}, "method", `method: invalid regular expression "[a-": `},
		{"header value", Spec{Headers: map[string]string{"X-Foo": "*"}}, "headers.X-Foo", `headers.X-Foo: invalid regular expression "*": `},
		{"header name", Spec{Headers: map[string]string{"X Foo": "a"}}, "headers.X Foo", `headers.X Foo: invalid header name "X Foo"`},
		{"empty header name", Spec{Headers: map[string]string{"": "a"}}, "headers.", `invalid header name ""`},
		{"perl lookahead", Spec{URL: "(?=a)"}, "url", `url: invalid regular expression "(?=a)"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Compile(tt.spec)
			if err == nil {
				t.Fatal("Compile succeeded, want error")
			}
			var fe *FieldError
			if !errors.As(err, &fe) || fe.Field != tt.field {
				t.Fatalf("error %v: want *FieldError for field %q", err, tt.field)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

func TestNewSetErrors(t *testing.T) {
	tests := []struct {
		name      string
		white     []Spec
		black     []Spec
		wantField string
	}{
		{"whitelist", []Spec{{URL: "ok"}, {URL: "("}}, nil, "whitelist[1].url"},
		{"blacklist", nil, []Spec{{Method: "+"}}, "blacklist[0].method"},
		{"blacklist header", []Spec{{}}, []Spec{{}, {}, {Headers: map[string]string{"A": "(?P<"}}}, "blacklist[2].headers.A"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := NewSet(tt.white, tt.black)
			if err == nil {
				t.Fatal("NewSet succeeded, want error")
			}
			if s != nil {
				t.Error("NewSet returned a Set with its error")
			}
			var fe *FieldError
			if !errors.As(err, &fe) || fe.Field != tt.wantField {
				t.Fatalf("error %v: want *FieldError for field %q", err, tt.wantField)
			}
			if !strings.HasPrefix(err.Error(), tt.wantField+": invalid ") {
				t.Errorf("error %q does not start with %q", err, tt.wantField)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	internal := Spec{URL: `^https?://[^/]*\.internal(:\d+)?/`}
	admin := Spec{URL: `/admin`}
	deletes := Spec{Method: "^DELETE$"}
	tests := []struct {
		name       string
		white      []Spec
		black      []Spec
		method     string
		url        string
		h          http.Header
		wantReason string // "" = allowed
	}{
		{"no rules allow", nil, nil, "GET", "http://anything/", nil, ""},
		{"whitelisted", []Spec{internal}, nil, "GET", "http://api.internal/x", nil, ""},
		{"second whitelist rule", []Spec{admin, internal}, nil, "GET", "http://api.internal/x", nil, ""},
		{"not whitelisted", []Spec{internal}, nil, "GET", "http://example.com/x", nil, "matches no whitelist rule"},
		{"blacklisted without whitelist", nil, []Spec{deletes}, "DELETE", "http://a/", nil, "matches blacklist rule 1"},
		{"blacklist miss without whitelist", nil, []Spec{deletes}, "GET", "http://a/", nil, ""},
		{"blacklist wins over whitelist", []Spec{internal}, []Spec{deletes, admin}, "GET", "http://api.internal/admin", nil, "matches blacklist rule 2"},
		{"whitelisted and not blacklisted", []Spec{internal}, []Spec{deletes, admin}, "GET", "http://api.internal/users", nil, ""},
		{"empty whitelist rule allows all", []Spec{{}}, []Spec{admin}, "PUT", "http://x/", nil, ""},
		{"empty blacklist rule refuses all", []Spec{internal}, []Spec{{}}, "GET", "http://api.internal/", nil, "matches blacklist rule 1"},
		{"header decides", []Spec{{Headers: map[string]string{"X-Tenant": "^acme$"}}}, nil, "GET", "http://x/",
			http.Header{"X-Tenant": {"other"}}, "matches no whitelist rule"},
		{"connect target", []Spec{{Method: "^CONNECT$", URL: `^db\.internal:5432$`}}, nil, "CONNECT", "db.internal:5432", nil, ""},
		{"connect other port", []Spec{{Method: "^CONNECT$", URL: `^db\.internal:5432$`}}, nil, "CONNECT", "db.internal:22", nil, "matches no whitelist rule"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := NewSet(tt.white, tt.black)
			if err != nil {
				t.Fatalf("NewSet: %v", err)
			}
			if got, want := s.HasWhitelist(), len(tt.white) > 0; got != want {
				t.Errorf("HasWhitelist() = %v, want %v", got, want)
			}
			err = s.Check(tt.method, tt.url, tt.h)
			if tt.wantReason == "" {
				if err != nil {
					t.Fatalf("Check = %v, want allowed", err)
				}
				return
			}
			var r *Refusal
			if !errors.As(err, &r) {
				t.Fatalf("Check = %v (%T), want *Refusal", err, err)
			}
			if r.Reason != tt.wantReason {
				t.Errorf("Reason = %q, want %q", r.Reason, tt.wantReason)
			}
			if got, want := err.Error(), tt.wantReason; got != want {
				t.Errorf("Error() = %q, want %q", got, want)
			}
		})
	}
}

func TestNilSet(t *testing.T) {
	var s *Set
	if err := s.Check("DELETE", "http://anything/", nil); err != nil {
		t.Errorf("nil Set refused: %v", err)
	}
	if s.HasWhitelist() {
		t.Error("nil Set has a whitelist")
	}
}

func BenchmarkCheck(b *testing.B) {
	s, err := NewSet(
		[]Spec{{Method: "^(GET|HEAD)$", URL: `^https?://api\.internal/`}, {URL: `^https?://[^/]*\.internal(:\d+)?/`, Headers: map[string]string{"X-Tenant": "^acme$"}}},
		[]Spec{{URL: "/admin"}, {Method: "^DELETE$"}},
	)
	if err != nil {
		b.Fatal(err)
	}
	h := http.Header{"X-Tenant": {"acme"}, "Accept": {"*/*"}}
	for b.Loop() {
		if err := s.Check("POST", "http://billing.internal:8443/v1/invoices?limit=10", h); err != nil {
			b.Fatal(err)
		}
	}
}
