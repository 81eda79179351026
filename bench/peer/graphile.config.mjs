// PostGraphile 5.1.5 as the benchmark's peer (python -m bench.three_way starts it with NODE_ENV=production):
// the amber preset, the pg adaptor, only the `peer` schema (bench/peer/schema.sql). PEER_DATABASE_URL is the
// bench database's URL (over PostgreSQL's Unix socket, as the gateway's).
import { PostGraphileAmberPreset } from "postgraphile/presets/amber";
import { makePgService } from "postgraphile/adaptors/pg";

const connectionString = process.env.PEER_DATABASE_URL;
if (!connectionString) {
  throw new Error("PEER_DATABASE_URL is not set");
}

/** @type {GraphileConfig.Preset} */
const preset = {
  extends: [PostGraphileAmberPreset],
  pgServices: [makePgService({ connectionString, schemas: ["peer"] })],
  grafserv: { graphqlPath: "/graphql", graphiql: false },
  grafast: { explain: false },
};

export default preset;
