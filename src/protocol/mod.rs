//! Wire types shared by the coordinator, the agent and the client.
