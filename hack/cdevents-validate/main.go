// cdevents-validate checks CDEvents with the CDEvents Go SDK, independently
// of the observer's own Rust code: each line of stdin is one CDEvent (the
// data of a CloudEvent in the CDEvents binding). It is parsed with the SDK's
// v0.5 parser and validated with api.Validate, which applies the spec's
// schema for the event's type and the custom schema its context.schemaUri
// names. Every schemaUri must be one given with -schema, so an event is never
// passed for lack of a schema. Prints one line per event; exits 1 if any
// event is invalid.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/cdevents/sdk-go/pkg/api"
	v05 "github.com/cdevents/sdk-go/pkg/api/v05"
)

type schemaFlags map[string]string

func (s schemaFlags) String() string { return fmt.Sprint(map[string]string(s)) }

func (s schemaFlags) Set(value string) error {
	uri, path, ok := strings.Cut(value, "=")
	if !ok {
		return fmt.Errorf("want URI=FILE, got %q", value)
	}
	s[uri] = path
	return nil
}

func main() {
	schemas := schemaFlags{}
	flag.Var(schemas, "schema", "URI=FILE: a custom schema, by the schemaUri events give (repeatable)")
	flag.Parse()
	for uri, path := range schemas {
		text, err := os.ReadFile(path)
		if err != nil {
			fail("reading schema %s: %v", path, err)
		}
		if err := api.LoadJsonSchema(uri, text); err != nil {
			fail("loading schema %s: %v", path, err)
		}
	}
	invalid := 0
	lines := bufio.NewScanner(os.Stdin)
	lines.Buffer(make([]byte, 0, 1<<20), 64<<20)
	for lines.Scan() {
		line := lines.Bytes()
		if len(strings.TrimSpace(string(line))) == 0 {
			continue
		}
		id, err := check(line, schemas)
		if err != nil {
			invalid++
			fmt.Printf("invalid %s: %v\n", id, err)
			continue
		}
		fmt.Printf("valid %s\n", id)
	}
	if err := lines.Err(); err != nil {
		fail("reading stdin: %v", err)
	}
	if invalid > 0 {
		os.Exit(1)
	}
}

func check(line []byte, schemas schemaFlags) (string, error) {
	var peek struct {
		Context struct {
			Id        string `json:"id"`
			SchemaUri string `json:"schemaUri"`
		} `json:"context"`
	}
	if err := json.Unmarshal(line, &peek); err != nil {
		return "?", fmt.Errorf("not JSON: %w", err)
	}
	id := peek.Context.Id
	if _, ok := schemas[peek.Context.SchemaUri]; !ok {
		return id, fmt.Errorf("schemaUri %q is not one given with -schema", peek.Context.SchemaUri)
	}
	event, err := v05.NewFromJsonBytes(line)
	if err != nil {
		return id, fmt.Errorf("the SDK cannot parse it: %w", err)
	}
	if err := api.Validate(event); err != nil {
		return id, fmt.Errorf("the SDK rejects it: %w", err)
	}
	return id, nil
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cdevents-validate: "+format+"\n", args...)
	os.Exit(2)
}
